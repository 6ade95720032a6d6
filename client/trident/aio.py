"""`trident.aio.Client`: the Trident client for asyncio, on tritonclient.grpc.aio or tritonclient.http.aio.

    async with Client("localhost:8001") as client:
        speech, boxes = await asyncio.gather(client.transcribe("talk.mp3"), client.detect("frame.jpg"))
        pages = await client.read_text_many(paths, concurrency=8)

Same methods, arguments, results and errors as `trident.Client` (both build requests and read answers with
`trident.calls`). Every call of one client shares one gRPC channel (HTTP/2 streams over one connection) or one
aiohttp session (a pool of keep-alive connections); it is opened by the first call, inside the running event
loop, and closed by `close()` or the `async with` block. Use a client from one event loop.

Cancelling the task that awaits a call cancels the request. Over gRPC the server is told (the RPC is
cancelled): Triton's batcher skips a cancelled request still in its queue (Triton's request_cancellation.md),
`whisper` drops a cancelled transcription before its next 30 s window (counted in
trident_request_errors_total{code="CANCELLED"}), and detect and easyocr finish a batch already running. Over
HTTP the connection is closed, and that is all: Triton 2.51 cancels no HTTP inference request, so it runs to the
end and its answer is dropped (tests/test_aio_client.py shows both).
"""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Iterable, Sequence, TypeVar

import numpy as np

from . import calls
from .inputs import ImageLike
from .results import DetectResult, TextLine, Transcription

Item = TypeVar("Item")
Result = TypeVar("Result")


class Client:
    """Asyncio client of one Trident server; its arguments as for `trident.Client` (TLS for gRPC, the
    restricted model-repository API's key)."""

    def __init__(self, url: str = "localhost", protocol: str | None = None, timeout: float = 120.0,
                 ssl: bool = False, root_certificates: str | None = None, private_key: str | None = None,
                 certificate_chain: str | None = None, admin_key: str | None = None):
        tls = calls.Tls(root_certificates, private_key, certificate_chain) if ssl else None
        self._endpoint = calls.endpoint(url, protocol, tls, admin_key)
        self.url, self.protocol, self.timeout = self._endpoint.address, self._endpoint.protocol, timeout
        self._triton: Any = None  # tritonclient's aio client: created by the first call, in the running loop
        self._module: Any = None
        self._closed = False

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel (or session); calls made afterwards raise RuntimeError."""
        self._closed = True
        triton, self._triton = self._triton, None
        if triton is not None:
            await triton.close()

    def _open(self):
        """tritonclient's aio client and module, created on first use (grpc.aio channels and aiohttp sessions
        belong to the event loop they were created in)."""
        if self._closed:
            raise RuntimeError("this trident.aio.Client is closed")
        if self._triton is None:
            if self.protocol == "grpc":
                import tritonclient.grpc.aio as module

                self._triton = module.InferenceServerClient(self.url, **self._endpoint.client_options())
            else:
                import tritonclient.http.aio as module

                # conn_timeout is aiohttp's total timeout of each request, as the sync client's network timeout
                self._triton = module.InferenceServerClient(self.url, conn_timeout=self.timeout)
            self._module = module
        return self._triton, self._module

    def _translate(self, exc: Exception, what: str) -> Exception:
        """As the sync client translates; aiohttp's dropped connections and asyncio's timeouts (not OSErrors
        before Python 3.11) mean an unreachable server too."""
        connection_errors: tuple[type[BaseException], ...] = (asyncio.TimeoutError,)
        if self.protocol == "http":
            import aiohttp

            connection_errors += (aiohttp.ClientConnectionError,)
        return calls.translate(exc, what, connection_errors)

    # -- generic ---------------------------------------------------------------------------------------------

    async def infer(self, model: str, inputs: dict[str, np.ndarray],
                    outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Send one request (arrays already carry the batch axis) and return the requested outputs."""
        client, module = self._open()
        tensors = calls.infer_inputs(module, inputs)
        requested = [module.InferRequestedOutput(name) for name in outputs]
        try:
            if self.protocol == "grpc":
                result = await client.infer(model, tensors, outputs=requested, client_timeout=self.timeout)
            else:
                result = await client.infer(model, tensors, outputs=requested)
        except Exception as exc:  # noqa: BLE001 - translated; cancellation (a BaseException) passes through
            raise self._translate(exc, model) from exc
        return {name: result.as_numpy(name) for name in outputs}

    async def health(self) -> dict:
        """Liveness, readiness and the readiness of each model in the repository."""
        client, _ = self._open()
        timeout = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}
        try:
            index, live, ready = await asyncio.gather(client.get_model_repository_index(
                                                          headers=self._endpoint.admin_headers, **timeout),
                                                      client.is_server_live(**timeout),
                                                      client.is_server_ready(**timeout))
        except Exception as exc:  # noqa: BLE001
            raise self._translate(exc, "health") from exc
        return calls.health_report(self._endpoint, live, ready, index)

    async def _send(self, build: Callable[..., calls.Call[Result]], *args: Any) -> Result:
        # Encoding (an array or PIL image to PNG) and file reading happen in a worker thread: they would
        # otherwise stall every other call of the event loop.
        call = await asyncio.to_thread(build, *args)
        return call.parse(await self.infer(call.model, call.inputs, call.outputs))

    # -- detection -------------------------------------------------------------------------------------------

    async def detect(self, image: ImageLike, conf: float | None = None, iou: float | None = None) -> DetectResult:
        """Detect objects in one image (path, bytes, PIL image or BGR uint8 array)."""
        return await self._send(calls.detect, image, conf, iou)

    async def detect_many(self, images: Iterable[ImageLike], conf: float | None = None, iou: float | None = None,
                          concurrency: int = 16) -> list[DetectResult]:
        """Detect objects in many images, at most `concurrency` requests in flight (the server batches them)."""
        return await bounded_map(lambda image: self.detect(image, conf, iou), images, concurrency)

    # -- speech ------------------------------------------------------------------------------------------------

    async def transcribe(self, audio: str | bytes | np.ndarray, language: str | None = None,
                         task: str = "transcribe",
                         temperature: float | Sequence[float] | None = None,
                         word_timestamps: bool = False) -> Transcription:
        """Transcribe (or translate to English) an audio file path, encoded bytes, or 16 kHz mono float samples;
        `temperature` and `word_timestamps` as for `trident.Client.transcribe`."""
        return await self._send(calls.transcribe, audio, language, task, temperature, word_timestamps)

    async def transcribe_many(self, audios: Iterable[str | bytes | np.ndarray], language: str | None = None,
                              task: str = "transcribe", temperature: float | Sequence[float] | None = None,
                              concurrency: int = 16, word_timestamps: bool = False) -> list[Transcription]:
        """Transcribe many audio inputs, at most `concurrency` requests in flight."""
        return await bounded_map(lambda audio: self.transcribe(audio, language, task, temperature, word_timestamps),
                                 audios, concurrency)

    # -- OCR ---------------------------------------------------------------------------------------------------

    async def read_text(self, image: ImageLike) -> list[TextLine]:
        """Read the text lines of one image, in EasyOCR's reading order."""
        return await self._send(calls.read_text, image)

    async def read_text_many(self, images: Iterable[ImageLike], concurrency: int = 16) -> list[list[TextLine]]:
        """Read text in many images, at most `concurrency` requests in flight."""
        return await bounded_map(self.read_text, images, concurrency)


async def bounded_map(call: Callable[[Item], Awaitable[Result]], items: Iterable[Item],
                      concurrency: int) -> list[Result]:
    """`[await call(item) for item in items]` with at most `concurrency` calls running at once, results in the
    order of `items`. `items` is consumed as calls finish (a generator is not read ahead). The first failure
    cancels the calls still running and is raised; cancelling the caller cancels them all."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    pending = enumerate(items)  # one iterator shared by the workers: each item is taken by exactly one
    results: dict[int, Result] = {}

    async def worker() -> None:
        for index, item in pending:
            results[index] = await call(item)

    workers = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
    try:
        await asyncio.gather(*workers)
    finally:
        for task in workers:  # after a failure (or our own cancellation): stop the other calls too
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return [results[index] for index in range(len(results))]
