"""`Client`: typed calls to the Trident models over tritonclient (gRPC or HTTP)."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Sequence, TypeVar

import numpy as np

from . import calls
from .inputs import ImageLike
from .results import DetectResult, TextLine, Transcription

Result = TypeVar("Result")


class Client:
    """Client of one Trident server.

    `url` is "host:port", "http://host:port" or "grpc://host:port"; without a port the protocol's default
    (gRPC 8001, HTTP 8000) is used. A gRPC name-resolver target ("dns:///host:8001", "ipv4:a:8001,b:8001")
    spreads requests over every replica it resolves to (`trident.balancing`). `timeout` bounds each request
    in seconds. Safe to share between threads. `trident.aio.Client` is the same client for asyncio.

    TLS (gRPC): `ssl=True`, with `root_certificates` (PEM file of the CA that signed the server's certificate;
    default: gRPC's system roots) and, for a server that asks for one (mutual TLS), the client's own
    `private_key` and `certificate_chain` (PEM files). `admin_key`: the value of a restricted model-repository
    API's header, sent by `health()` (default: $TRIDENT_ADMIN_KEY; "" sends none).
    """

    def __init__(self, url: str = "localhost", protocol: str | None = None, timeout: float = 120.0,
                 ssl: bool = False, root_certificates: str | None = None, private_key: str | None = None,
                 certificate_chain: str | None = None, admin_key: str | None = None):
        tls = calls.Tls(root_certificates, private_key, certificate_chain) if ssl else None
        self._endpoint = calls.endpoint(url, protocol, tls, admin_key)
        self.url, self.protocol, self.timeout = self._endpoint.address, self._endpoint.protocol, timeout
        self._local = threading.local()  # tritonclient's HTTP client is not thread-safe: one per thread

    @property
    def _triton(self):
        client = getattr(self._local, "client", None)
        if client is None:
            if self.protocol == "grpc":
                import tritonclient.grpc as module

                client = module.InferenceServerClient(self.url, **self._endpoint.client_options())
            else:
                import tritonclient.http as module

                client = module.InferenceServerClient(self.url, connection_timeout=self.timeout,
                                                      network_timeout=self.timeout)
            self._local.client, self._local.module = client, module
        return client

    # -- generic ---------------------------------------------------------------------------------------------

    def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Send one request (arrays already carry the batch axis) and return the requested outputs."""
        client = self._triton
        module = self._local.module
        tensors = calls.infer_inputs(module, inputs)
        requested = [module.InferRequestedOutput(name) for name in outputs]
        try:
            if self.protocol == "grpc":
                result = client.infer(model, tensors, outputs=requested, client_timeout=self.timeout)
            else:
                result = client.infer(model, tensors, outputs=requested)
        except Exception as exc:  # noqa: BLE001 - translated to the client's own exception types
            raise calls.translate(exc, model) from exc
        return {name: result.as_numpy(name) for name in outputs}

    def health(self) -> dict:
        """Liveness, readiness and the readiness of each model in the repository."""
        client = self._triton
        try:
            index = client.get_model_repository_index(headers=self._endpoint.admin_headers)
            return calls.health_report(self._endpoint, client.is_server_live(), client.is_server_ready(), index)
        except Exception as exc:  # noqa: BLE001
            raise calls.translate(exc, "health") from exc

    def _send(self, call: calls.Call[Result]) -> Result:
        return call.parse(self.infer(call.model, call.inputs, call.outputs))

    # -- detection -------------------------------------------------------------------------------------------

    def detect(self, image: ImageLike, conf: float | None = None, iou: float | None = None) -> DetectResult:
        """Detect objects in one image (path, bytes, PIL image or BGR uint8 array)."""
        return self._send(calls.detect(image, conf, iou))

    def detect_many(self, images: Iterable[ImageLike], conf: float | None = None, iou: float | None = None,
                    concurrency: int = 16) -> list[DetectResult]:
        """Detect objects in many images, `concurrency` requests in flight (the server batches them)."""
        return self._map(lambda image: self.detect(image, conf, iou), images, concurrency)

    # -- speech ------------------------------------------------------------------------------------------------

    def transcribe(self, audio: str | bytes | np.ndarray, language: str | None = None, task: str = "transcribe",
                   temperature: float | Sequence[float] | None = None,
                   word_timestamps: bool = False) -> Transcription:
        """Transcribe (or translate to English) an audio file path, encoded bytes, or 16 kHz mono float samples.

        `temperature`: the decoding temperatures tried in turn while a window fails whisper's quality checks
        (server default 0.0, 0.2, ..., 1.0, as whisper.transcribe); `0.0` alone decodes greedily, deterministically.
        `word_timestamps`: also time each word (`Segment.words`), as whisper.transcribe(word_timestamps=True).
        """
        return self._send(calls.transcribe(audio, language, task, temperature, word_timestamps))

    def transcribe_many(self, audios: Iterable[str | bytes | np.ndarray], language: str | None = None,
                        task: str = "transcribe", temperature: float | Sequence[float] | None = None,
                        concurrency: int = 16, word_timestamps: bool = False) -> list[Transcription]:
        """Transcribe many audio inputs concurrently."""
        return self._map(lambda audio: self.transcribe(audio, language, task, temperature, word_timestamps),
                         audios, concurrency)

    # -- OCR ---------------------------------------------------------------------------------------------------

    def read_text(self, image: ImageLike) -> list[TextLine]:
        """Read the text lines of one image, in EasyOCR's reading order."""
        return self._send(calls.read_text(image))

    def read_text_many(self, images: Iterable[ImageLike], concurrency: int = 16) -> list[list[TextLine]]:
        """Read text in many images concurrently."""
        return self._map(self.read_text, images, concurrency)

    @staticmethod
    def _map(call, items, concurrency: int) -> list:
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            return list(pool.map(call, items))

