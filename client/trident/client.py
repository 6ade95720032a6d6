"""`Client`: typed calls to the Trident models over tritonclient (gRPC or HTTP)."""
from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Sequence

import numpy as np

from .balancing import channel_args, is_resolver_target
from .errors import InvalidInputError, ServerError, ServerUnavailableError
from .inputs import ImageLike, encode_image, read_bytes
from .results import Detection, DetectResult, Segment, TextLine, Transcription

DEFAULT_PORTS = {"grpc": 8001, "http": 8000}


class Client:
    """Client of one Trident server.

    `url` is "host:port", "http://host:port" or "grpc://host:port"; without a port the protocol's default
    (gRPC 8001, HTTP 8000) is used. A gRPC name-resolver target ("dns:///host:8001", "ipv4:a:8001,b:8001")
    spreads requests over every replica it resolves to (`trident.balancing`). `timeout` bounds each request
    in seconds. Safe to share between threads.
    """

    def __init__(self, url: str = "localhost", protocol: str | None = None, timeout: float = 120.0):
        self._channel_args = None
        if is_resolver_target(url):  # "dns:///svc:8001", "ipv4:a:8001,b:8001": gRPC balances over replicas
            if (protocol or "grpc").lower() != "grpc":
                raise ValueError(f"{url!r} is a gRPC name-resolver target: protocol must be 'grpc'")
            address, protocol, self._channel_args = url, "grpc", channel_args()
        else:
            scheme, _, address = url.rpartition("://")
            protocol = (protocol or scheme or "grpc").lower()
            if protocol not in DEFAULT_PORTS:
                raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
            if ":" not in address:
                address = f"{address}:{DEFAULT_PORTS[protocol]}"
        self.url, self.protocol, self.timeout = address, protocol, timeout
        self._local = threading.local()  # tritonclient's HTTP client is not thread-safe: one per thread

    @property
    def _triton(self):
        client = getattr(self._local, "client", None)
        if client is None:
            if self.protocol == "grpc":
                import tritonclient.grpc as module

                client = module.InferenceServerClient(self.url, channel_args=self._channel_args)
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
        tensors = []
        for name, array in inputs.items():
            datatype = "BYTES" if array.dtype == np.object_ else _TRITON_DTYPES[array.dtype.str.lstrip("<>|=")]
            tensor = module.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        requested = [module.InferRequestedOutput(name) for name in outputs]
        try:
            if self.protocol == "grpc":
                result = client.infer(model, tensors, outputs=requested, client_timeout=self.timeout)
            else:
                result = client.infer(model, tensors, outputs=requested)
        except Exception as exc:  # noqa: BLE001 - translated to the client's own exception types
            raise _translate(exc, model) from exc
        return {name: result.as_numpy(name) for name in outputs}

    def health(self) -> dict:
        """Liveness, readiness and the readiness of each model in the repository."""
        client = self._triton
        try:
            index = client.get_model_repository_index()
            if self.protocol == "grpc":
                index = [{"name": m.name, "state": m.state} for m in index.models]
            return {"url": self.url, "protocol": self.protocol, "live": client.is_server_live(),
                    "ready": client.is_server_ready(),
                    "models": {m["name"]: m.get("state", "") for m in index}}
        except Exception as exc:  # noqa: BLE001
            raise _translate(exc, "health") from exc

    # -- detection -------------------------------------------------------------------------------------------

    def detect(self, image: ImageLike, conf: float | None = None, iou: float | None = None) -> DetectResult:
        """Detect objects in one image (path, bytes, PIL image or BGR uint8 array)."""
        inputs = {"IMAGE": np.array([[encode_image(image)]], dtype=np.object_)}
        if conf is not None:
            inputs["CONF_THRESHOLD"] = np.array([[conf]], dtype=np.float32)
        if iou is not None:
            inputs["IOU_THRESHOLD"] = np.array([[iou]], dtype=np.float32)
        out = self.infer("detect", inputs, ["BOXES", "SCORES", "CLASSES", "LABELS"])
        labels = [label.decode("utf-8") for label in out["LABELS"][0]]
        return DetectResult([
            Detection(tuple(float(v) for v in box), float(score), int(cls), label)
            for box, score, cls, label in zip(out["BOXES"][0], out["SCORES"][0], out["CLASSES"][0], labels)
        ])

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
        inputs = transcription_inputs(audio, language, task, temperature, word_timestamps)
        return transcription_result(self.infer("whisper", inputs, TRANSCRIPTION_OUTPUTS))

    def transcribe_many(self, audios: Iterable[str | bytes | np.ndarray], language: str | None = None,
                        task: str = "transcribe", temperature: float | Sequence[float] | None = None,
                        concurrency: int = 16, word_timestamps: bool = False) -> list[Transcription]:
        """Transcribe many audio inputs concurrently."""
        return self._map(lambda audio: self.transcribe(audio, language, task, temperature, word_timestamps),
                         audios, concurrency)

    # -- OCR ---------------------------------------------------------------------------------------------------

    def read_text(self, image: ImageLike) -> list[TextLine]:
        """Read the text lines of one image, in EasyOCR's reading order."""
        out = self.infer("easyocr", {"IMAGE": np.array([[encode_image(image)]], dtype=np.object_)},
                         ["BOXES", "TEXTS", "SCORES"])
        return [TextLine([(float(x), float(y)) for x, y in box], text.decode("utf-8"), float(score))
                for box, text, score in zip(out["BOXES"][0], out["TEXTS"][0], out["SCORES"][0])]

    def read_text_many(self, images: Iterable[ImageLike], concurrency: int = 16) -> list[list[TextLine]]:
        """Read text in many images concurrently."""
        return self._map(self.read_text, images, concurrency)

    @staticmethod
    def _map(call, items, concurrency: int) -> list:
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            return list(pool.map(call, items))


TRANSCRIPTION_OUTPUTS = ("TEXT", "LANGUAGE", "SEGMENTS")


def transcription_inputs(audio: str | bytes | np.ndarray, language: str | None = None, task: str = "transcribe",
                         temperature: float | Sequence[float] | None = None,
                         word_timestamps: bool = False) -> dict[str, np.ndarray]:
    """The `whisper` request's inputs (batch axis included) for `Client.transcribe`'s arguments."""
    if isinstance(audio, np.ndarray):
        inputs = {"PCM": np.asarray(audio, dtype=np.float32).reshape(1, -1)}
    else:
        inputs = {"AUDIO": np.array([[read_bytes(audio)]], dtype=np.object_)}
    if language:
        inputs["LANGUAGE"] = np.array([[language.encode()]], dtype=np.object_)
    inputs["TASK"] = np.array([[task.encode()]], dtype=np.object_)
    if temperature is not None:
        inputs["TEMPERATURE"] = np.array(temperature, dtype=np.float32).reshape(1, -1)
    if word_timestamps:
        inputs["WORD_TIMESTAMPS"] = np.array([[True]])
    return inputs


def transcription_result(outputs: dict[str, np.ndarray]) -> Transcription:
    """The `Transcription` in a `whisper` response's TRANSCRIPTION_OUTPUTS."""
    text, language, segments = (outputs[name].reshape(-1)[0] for name in TRANSCRIPTION_OUTPUTS)
    return Transcription(text=text.decode("utf-8"), language=language.decode("utf-8"),
                         segments=[Segment.from_dict(s) for s in json.loads(segments)])


_TRITON_DTYPES = {"f4": "FP32", "f2": "FP16", "f8": "FP64", "i4": "INT32", "i8": "INT64", "u1": "UINT8",
                  "i1": "INT8", "b1": "BOOL"}


def _translate(exc: Exception, what: str) -> Exception:
    """tritonclient's exception (or a socket error) as one of ours, with the server's message."""
    status = str(getattr(exc, "status", lambda: "")() or "")
    message = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
    if "INVALID_ARGUMENT" in status or status == "400":
        return InvalidInputError(f"{what}: {message}")
    if any(s in status for s in ("UNAVAILABLE", "DEADLINE_EXCEEDED")) or isinstance(exc, (OSError, TimeoutError)):
        return ServerUnavailableError(f"{what}: {message or exc}")
    return ServerError(f"{what}: {message or exc}")
