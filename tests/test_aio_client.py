"""`trident.aio.Client` over the real server: the sync client's answers, one shared channel, the same errors,
cancellation that reaches the server, and `*_many` never more than `concurrency` requests in flight.

Each test runs its coroutine with `asyncio.run` (no pytest plugin needed). What the server saw is read from its
own books: Triton's per-batch-size execution statistics, its metrics endpoint (parsed by `trident.stats`) and the
whisper model's trident_request_errors_total{code="CANCELLED"}.
"""
from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Awaitable, Callable

import cv2
import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from ultralytics.utils import ASSETS

from trident import InvalidInputError, ServerError, ServerUnavailableError, aio
from trident.aio import bounded_map
from trident.stats import scrape
from trident_serving.audio import SAMPLE_RATE, decode_audio
from trident_serving.server import free_port

DATA = Path(__file__).resolve().parent / "data"
PROTOCOLS = ["grpc", "http"]
CONF = 0.05  # synthetic YOLO weights: dozens of boxes per image at this threshold
GREEDY = (0.0,)


def url(triton, protocol: str) -> str:
    return triton.grpc_url if protocol == "grpc" else triton.http_url


def with_client(triton, protocol: str, use: Callable[[aio.Client], Awaitable], address: str | None = None,
                **options):
    """Run `use(client)` with an aio client of the test server (or of `address`), in a fresh event loop."""
    async def main():
        async with aio.Client(address or url(triton, protocol), protocol=protocol, **options) as client:
            return await use(client)
    return asyncio.run(main())


def metric(triton, name: str, **labels: str) -> float:
    return scrape(f"http://127.0.0.1:{triton.options.metrics_port}/metrics").total(name, **labels)


async def until(condition: Callable[[], bool], what: str, timeout: float = 180.0) -> None:
    """Wait for `condition` (polled); generous `timeout`: a whisper step takes seconds on a loaded CPU."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.1)


# -------------------------------------------------------------------------------------- same answers

def test_health_equals_sync(triton):
    for protocol in PROTOCOLS:
        served = with_client(triton, protocol, lambda client: client.health())
        assert served == triton.client(protocol).health()
        assert served["live"] and served["ready"] and served["models"]


@pytest.mark.yolo
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_infer_and_detect_equal_sync(triton, protocol):
    bgr = cv2.imread(str(ASSETS / "zidane.jpg"))
    images = [ASSETS / "bus.jpg", bgr, Image.open(ASSETS / "zidane.jpg")]  # path, BGR array, PIL image
    sync = triton.client(protocol)
    expected = [sync.detect(image, conf=CONF) for image in images]
    inputs = {"IMAGE": np.array([[(ASSETS / "bus.jpg").read_bytes()]], dtype=np.object_)}

    async def use(client):
        alone = [await client.detect(image, conf=CONF) for image in images]  # one at a time, as sent above
        raw = await client.infer("detect", inputs, ["BOXES", "LABELS"])
        return alone, raw, await client.detect_many(images, conf=CONF, concurrency=3)

    alone, raw, many = with_client(triton, protocol, use)
    assert all(len(result) >= 24 for result in expected), "too few boxes for a meaningful comparison"
    assert alone == expected
    expected_raw = sync.infer("detect", inputs, ["BOXES", "LABELS"])
    np.testing.assert_array_equal(raw["BOXES"], expected_raw["BOXES"])
    np.testing.assert_array_equal(raw["LABELS"], expected_raw["LABELS"])
    for served, same in zip(many, expected):  # batched with each other: float rounding may differ
        np.testing.assert_array_equal(served.class_ids, same.class_ids)
        np.testing.assert_allclose(served.boxes, same.boxes, atol=1e-3)
        np.testing.assert_allclose(served.scores, same.scores, atol=1e-4)


@pytest.mark.whisper
def test_transcribe_equals_sync(triton):
    """The sync call, a gRPC transcribe_many (path and PCM of one clip) and an HTTP call, all at once: the
    server decodes them in one batch (one step on a CPU), so text and segments are equal and the
    log-probabilities equal up to batch rounding (as whisper's own tests compare them)."""
    path = DATA / "speech_en.flac"
    pcm = decode_audio(path.read_bytes())  # the samples the server decodes from the file
    arguments = dict(language="en", task="transcribe", temperature=GREEDY)

    async def main():
        async with aio.Client(triton.grpc_url) as grpc, aio.Client(triton.http_url, protocol="http") as http:
            return await asyncio.gather(asyncio.to_thread(triton.client("grpc").transcribe, path, **arguments),
                                        grpc.transcribe_many([path, pcm], **arguments, concurrency=2),
                                        http.transcribe(path, **arguments))

    expected, (from_path, from_pcm), over_http = asyncio.run(main())
    assert expected.text.strip() and expected.language == "en" and expected.segments
    for served in (from_path, from_pcm, over_http):
        assert (served.text, served.language) == (expected.text, expected.language)
        assert [(s.start, s.end, s.text, s.temperature) for s in served.segments] == \
            [(s.start, s.end, s.text, s.temperature) for s in expected.segments]
        np.testing.assert_allclose([s.avg_logprob for s in served.segments],
                                   [s.avg_logprob for s in expected.segments], atol=1e-4)


@pytest.mark.easyocr
@pytest.mark.parametrize("protocol, image", [("grpc", DATA / "ocr_en_rotated.png"),
                                             ("http", cv2.imread(str(DATA / "ocr_en_rotated.png")))],
                         ids=["grpc-path", "http-array"])
def test_read_text_equals_sync(triton, protocol, image):
    expected = triton.client(protocol).read_text(image)

    async def use(client):
        return await client.read_text(image), await client.read_text_many([image, image])

    alone, many = with_client(triton, protocol, use)
    assert len(expected) >= 4 and all(line.text for line in expected), "synthetic weights read 8 lines here"
    assert alone == expected
    for served in many:  # batched together: float rounding may differ
        assert [line.text for line in served] == [line.text for line in expected]
        np.testing.assert_allclose([line.box for line in served], [line.box for line in expected], atol=1.0)
        np.testing.assert_allclose([line.score for line in served], [line.score for line in expected], atol=1e-3)


# --------------------------------------------------------------------------------- one channel / session

def connections_to(port: int) -> set[tuple[str, int]]:
    """Local addresses of this process's established TCP connections to the server's `port`."""
    return {c.laddr for c in psutil.Process().net_connections(kind="tcp")
            if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED}


@pytest.mark.yolo
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_calls_share_one_channel(triton, protocol):
    """gRPC: every call of a client (health's three RPCs and four detects at once, twice) rides one HTTP/2
    connection. HTTP: one aiohttp session, whose keep-alive connections (one per request in flight, at most 7
    here) serve the second round too. Both closed by close()."""
    port = int(url(triton, protocol).rsplit(":", 1)[1])
    images = [ASSETS / "bus.jpg"] * 8
    before = connections_to(port)

    async def use(client):
        rounds = []
        for _ in range(2):
            await asyncio.gather(client.health(), client.detect_many(images, concurrency=4))
            rounds.append(connections_to(port) - before)
        return rounds

    first, second = with_client(triton, protocol, use)
    if protocol == "grpc":
        assert len(first) == 1 and second == first
    else:
        assert first and len(first | second) <= 7, (first, second)
    assert not connections_to(port) - before, "close() must close the channel"


# ------------------------------------------------------------------------------------------------ errors

@pytest.mark.yolo
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_errors_are_translated_as_by_the_sync_client(triton, protocol):
    sync = triton.client(protocol)
    with pytest.raises(InvalidInputError) as expected:
        sync.detect(b"not an image")
    with pytest.raises(InvalidInputError) as served:
        with_client(triton, protocol, lambda client: client.detect(b"not an image"))
    assert str(served.value) == str(expected.value) and "could not be decoded" in str(served.value)

    with pytest.raises(ServerError, match="unknown model"):
        with_client(triton, protocol, lambda client: client.infer("no_such_model", {}, ["X"]))
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with pytest.raises(ServerUnavailableError, match="detect"):
            with_client(triton, protocol, lambda client: client.detect(ASSETS / "bus.jpg"),
                        address="%s:%d" % silent.getsockname(), timeout=0.5)
    for call in (lambda client: client.health(), lambda client: client.detect(ASSETS / "bus.jpg")):
        with pytest.raises(ServerUnavailableError):  # nothing listens there
            with_client(triton, protocol, call, address=f"127.0.0.1:{free_port()}", timeout=10)

def test_bad_arguments_and_closed_client():
    with pytest.raises(ValueError, match="protocol must be 'grpc' or 'http'"):
        aio.Client("ftp://host")
    with pytest.raises(ValueError, match="name-resolver target"):
        aio.Client("dns:///trident:8001", protocol="http")

    async def closed():
        client = aio.Client("127.0.0.1:1")
        await client.close()
        await client.detect(b"")

    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(closed())
    with pytest.raises(ValueError, match="concurrency must be at least 1"):
        asyncio.run(aio.Client("127.0.0.1:1").detect_many([b""], concurrency=0))


# ------------------------------------------------------------------------------------------ cancellation

async def cancel_once_admitted(triton, client: aio.Client, audio: np.ndarray) -> tuple[float, float]:
    """Send `audio` to whisper and cancel the task once whisper has admitted it (Triton counted its execution:
    execute returns on admission); returns the CANCELLED errors and transcribed seconds counted before."""
    executions = metric(triton, "nv_inference_exec_count", model="whisper")
    cancelled = metric(triton, "trident_request_errors_total", model="whisper", code="CANCELLED")
    transcribed = metric(triton, "trident_whisper_transcribed_audio_seconds_total", model="whisper")
    task = asyncio.ensure_future(client.transcribe(audio, temperature=GREEDY))
    await until(lambda: metric(triton, "nv_inference_exec_count", model="whisper") > executions,
                "whisper admitted the request")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return cancelled, transcribed


@pytest.mark.whisper
def test_cancelling_a_grpc_call_cancels_it_on_the_server(triton):
    """The model sees the RPC cancelled and drops the job before its next 30 s window. Three windows of audio,
    so the job cannot finish before that check."""
    audio = np.zeros(90 * SAMPLE_RATE, np.float32)

    async def main():
        async with aio.Client(triton.grpc_url) as client:
            cancelled, transcribed = await cancel_once_admitted(triton, client, audio)
            await until(lambda: metric(triton, "trident_request_errors_total", model="whisper",
                                       code="CANCELLED") > cancelled, "the server dropped the job")
            assert metric(triton, "trident_whisper_transcribed_audio_seconds_total", model="whisper") == transcribed
            assert (await client.health())["ready"]  # the channel serves on after a cancelled call

    asyncio.run(main())


@pytest.mark.whisper
def test_cancelling_an_http_call_does_not_reach_the_server(triton):
    """Over HTTP, cancelling closes the connection, but Triton 2.51's HTTP endpoint does not cancel the request:
    the job is transcribed to the end (its audio counted as transcribed) and nothing is counted as cancelled."""
    seconds = 20  # one window: the job costs one step
    audio = np.zeros(seconds * SAMPLE_RATE, np.float32)

    async def main():
        async with aio.Client(triton.http_url, protocol="http") as client:
            cancelled, transcribed = await cancel_once_admitted(triton, client, audio)
            await until(lambda: metric(triton, "trident_whisper_transcribed_audio_seconds_total",
                                       model="whisper") >= transcribed + seconds, "the job finished")
            assert metric(triton, "trident_request_errors_total", model="whisper", code="CANCELLED") == cancelled

    asyncio.run(main())


# ------------------------------------------------------------------------------------- bounded concurrency

def batch_sizes(triton, model: str) -> Counter:
    """How many executions of `model` the server ran at each batch size (Triton's statistics extension)."""
    stats = grpcclient.InferenceServerClient(triton.grpc_url).get_inference_statistics(model, as_json=True)
    return Counter({int(b["batch_size"]): int(b["compute_infer"]["count"])
                    for b in stats["model_stats"][0].get("batch_stats", [])})


async def batches_since(triton, model: str, start: Counter, requests: int) -> Counter:
    """The executions since `start`, once they hold `requests` requests (Triton records an execution's
    statistics after sending its responses, so the last answers may arrive first)."""
    def served() -> int:
        return sum(size * count for size, count in (batch_sizes(triton, model) - start).items())

    await until(lambda: served() >= requests, f"the server's statistics count {requests} {model} requests")
    return batch_sizes(triton, model) - start


@pytest.mark.yolo
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_many_keeps_at_most_concurrency_requests_in_flight(triton, protocol):
    """detect_many runs exactly `concurrency` real calls at once (counted around the client's own `detect`, which
    it calls for each image), and the server never sees more: detect's dynamic batcher puts every request
    waiting in its queue into the next batch (max_batch_size 64, no delay), so no batch holds more than 3. Whether
    two of the three wait together depends on timing (detect runs two instances: a CI run saw only batches of
    1), so overlap is shown by the count, not by the batches. With concurrency=12 the same images form bigger
    batches: the server-side measure does see requests beyond the bound."""
    images = [ASSETS / "bus.jpg", ASSETS / "zidane.jpg"] * 6

    async def use(client):
        detect, in_flight, peaks = client.detect, [0], []

        async def counted(*args, **kwargs):
            in_flight[0] += 1
            peaks[-1] = max(peaks[-1], in_flight[0])
            try:
                return await detect(*args, **kwargs)
            finally:
                in_flight[0] -= 1

        client.detect = counted
        batches = []
        for concurrency in (3, len(images)):
            start = batch_sizes(triton, "detect")
            peaks.append(0)
            await client.detect_many(images, concurrency=concurrency)
            batches.append(await batches_since(triton, "detect", start, len(images)))
        return peaks, batches

    (bounded_peak, unbounded_peak), (bounded, unbounded) = with_client(triton, protocol, use)
    assert (bounded_peak, unbounded_peak) == (3, len(images))
    assert sum(size * count for size, count in bounded.items()) == len(images), bounded
    assert max(bounded) <= 3, f"batch sizes {dict(bounded)}: more than 3 requests were in flight"
    assert sum(size * count for size, count in unbounded.items()) == len(images), unbounded
    assert max(unbounded) > 3, f"batch sizes {dict(unbounded)}: the measure cannot see concurrency"


def test_bounded_map_order_bound_laziness_and_failure():
    """bounded_map without a server: results in input order, at most `concurrency` calls at once, items read
    only as calls finish, and a failure cancels the calls still running."""
    running, most, taken, cancelled = 0, 0, [], []

    async def call(item: int) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            await asyncio.sleep(0.001 * (item % 5))  # finish out of order
            if item == 97:
                raise KeyError(item)
            return item * 2
        except asyncio.CancelledError:
            cancelled.append(item)
            raise
        finally:
            running -= 1

    def items(n: int):
        for i in range(n):
            taken.append(i)
            yield i

    assert asyncio.run(bounded_map(call, items(40), 4)) == [i * 2 for i in range(40)]
    assert most == 4 and running == 0
    taken.clear()
    with pytest.raises(KeyError):
        asyncio.run(bounded_map(call, items(1000), 8))
    assert len(taken) < 1000 and running == 0 and cancelled, "the first failure stops the rest"
