"""`whisper` over the real server: parity with whisper.transcribe, continuous batching, bad input.

The repository holds the tiny architecture with seeded random weights: transcripts are garbage, and
whisper.transcribe on the same weights and samples produces the same garbage, which is what is compared.
Greedy decoding (TEMPERATURE [0]) is deterministic and compared exactly; with the default temperature schedule
the re-decoded windows sample at random, so there the *windows* that fell back are compared.
"""
from __future__ import annotations

import io
import json
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, TypeVar

import av
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import whisper
from conftest import Server, serve

from perf.scaleout import served_models
from trident import Client, InvalidInputError, TridentError
from trident.stats import ERRORS, Snapshot, scrape
from trident_serving import metrics
from trident_serving.asr_ct2 import ENGINES
from trident_serving.audio import SAMPLE_RATE, decode_audio

pytestmark = pytest.mark.whisper
DATA = Path(__file__).resolve().parent / "data"
GREEDY = (0.0,)
DEFAULT_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


@pytest.fixture(scope="session")
def model(triton):
    """whisper.load_model on the very checkpoint the server loaded."""
    manifest = json.loads((triton.repository / "export.json").read_text())
    return whisper.load_model(manifest["whisper"]["weights"], device="cpu")


@pytest.fixture(scope="session")
def clips() -> dict[str, np.ndarray]:
    en = decode_audio((DATA / "speech_en.wav").read_bytes())
    ko = decode_audio((DATA / "speech_ko.ogg").read_bytes())
    silence = lambda seconds: np.zeros(int(seconds * SAMPLE_RATE), np.float32)  # noqa: E731
    noise = 0.1 * np.random.default_rng(0).standard_normal(4 * SAMPLE_RATE).astype(np.float32)
    return {"en": en, "ko": ko, "noise": noise,
            "long": np.concatenate([en, silence(20), ko, en, silence(25), ko, silence(10)])}  # > 60 s


# -- the worker's own metrics (trident_serving.metrics): whisper batches in its worker, not in Triton's batcher

T = TypeVar("T")


def worker_metrics(server: Server) -> Snapshot:
    return scrape(f"http://127.0.0.1:{server.options.metrics_port}/metrics")


def whisper_total(snapshot: Snapshot, name: str, **labels: str) -> float:
    return snapshot.total(name, model="whisper", **labels)


def shared_steps(snapshot: Snapshot) -> float:
    """Worker steps so far that decoded more than one window together (trident_whisper_step_windows)."""
    name = metrics.WHISPER_STEP_WINDOWS.name
    at_most_one = [v for (sample, labels), v in snapshot.samples.items() if sample == f"{name}_bucket"
                   and ("model", "whisper") in labels and float(dict(labels)["le"]) == 1]
    assert len(at_most_one) == 1, f"{name} has no le=1 bucket: its buckets changed"
    return whisper_total(snapshot, f"{name}_count") - at_most_one[0]


def wait_until(condition: Callable[[], T], what: str, timeout: float) -> T:
    """Poll `condition` until it returns something true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.2)
    return value


def reference(model, audio: np.ndarray, temperature=GREEDY, **options) -> dict:
    torch.manual_seed(0)
    return whisper.transcribe(model, audio, temperature=temperature, condition_on_previous_text=False,
                              fp16=False, verbose=None, **options)


def assert_same(result, expected: dict) -> None:
    """Text, language and segment boundaries equal; log-probabilities equal up to batch rounding."""
    assert result.text == expected["text"]
    assert result.language == expected["language"]
    assert [(s.start, s.end, s.text) for s in result.segments] == \
        [(s["start"], s["end"], s["text"]) for s in expected["segments"]]
    np.testing.assert_allclose([s.avg_logprob for s in result.segments],
                               [s["avg_logprob"] for s in expected["segments"]], atol=1e-4)
    np.testing.assert_allclose([s.no_speech_prob for s in result.segments],
                               [s["no_speech_prob"] for s in expected["segments"]], atol=1e-4)


@pytest.mark.parametrize("clip", ["en", "long"])
def test_greedy_transcription_equals_whisper_transcribe(client, model, clips, clip):
    expected = reference(model, clips[clip])
    assert expected["text"].strip(), "the comparison must not be between two empty transcripts"
    assert_same(client.transcribe(clips[clip], temperature=GREEDY), expected)
    if clip == "long":
        assert len({s["seek"] for s in expected["segments"]}) >= 3


@pytest.mark.parametrize("ext", ["wav", "flac", "mp3", "ogg", "m4a"])
def test_encoded_files(triton, model, ext):
    data = (DATA / f"speech_ko.{ext}").read_bytes()
    expected = reference(model, decode_audio(data))
    assert expected["text"].strip()
    assert_same(triton.client("grpc").transcribe(data, temperature=GREEDY), expected)


def test_language_and_task(client, model, clips):
    result = client.transcribe(clips["ko"], language="ko", task="translate", temperature=GREEDY)
    assert result.language == "ko"
    assert_same(result, reference(model, clips["ko"], language="ko", task="translate"))


def test_default_schedule_falls_back_on_the_same_windows(triton, model, clips):
    """Random weights fail whisper's quality checks: the window is re-decoded, on the server as in transcribe.

    One window over gRPC keeps this affordable on a CPU (six 224-token decodes on each side); the unit tests
    cover multi-window fallback with thresholds that make only some windows fall back."""
    expected = reference(model, clips["en"], temperature=DEFAULT_TEMPERATURES)
    served = triton.client("grpc").transcribe(clips["en"])  # the default schedule
    assert len(served.segments) == len(expected["segments"]) > 0
    assert [round(s.start, 2) for s in served.segments] == [round(s["start"], 2) for s in expected["segments"]]
    assert {s["temperature"] for s in expected["segments"]} == {1.0}
    assert [s.temperature for s in served.segments] == [s["temperature"] for s in expected["segments"]]
    assert served.text.strip()


def test_concurrent_mixed_lengths_get_what_they_get_alone(triton, clips):
    """8 requests of four lengths at once get what each got alone, and the worker decoded them in shared steps:
    the same windows as alone, in fewer steps (its step histogram; whisper batches in its worker, and Triton's
    execution count says nothing about that)."""
    client = Client(triton.grpc_url, timeout=600)  # an 8-window step on a busy 2-core CPU can outlast the 120 s default
    names = ["long", "en", "ko", "noise"] * 2
    start = worker_metrics(triton)
    assert whisper_total(start, metrics.WHISPER_ACTIVE.name) == 0, "whisper still works on an earlier request"
    alone = {name: client.transcribe(clips[name], temperature=GREEDY) for name in set(names)}
    before = worker_metrics(triton)  # each step's metrics are published before its requests are answered
    with ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(lambda n: client.transcribe(clips[n], temperature=GREEDY), names))
    after = worker_metrics(triton)
    for name, result in zip(names, results):
        assert_same(result, alone[name].to_dict())

    def delta(first: Snapshot, second: Snapshot, name: str) -> float:
        return whisper_total(second, name) - whisper_total(first, name)

    windows, steps = f"{metrics.WHISPER_STEP_WINDOWS.name}_sum", f"{metrics.WHISPER_STEP_WINDOWS.name}_count"
    assert delta(before, after, "nv_inference_count") == len(names)
    assert delta(start, before, windows) == delta(start, before, steps) >= 4, "one window per step, alone"
    assert delta(before, after, windows) == 2 * delta(start, before, windows)  # the same windows...
    assert shared_steps(after) > shared_steps(before), "no step decoded two requests' windows together"
    assert delta(before, after, steps) < delta(before, after, windows)  # ...in fewer steps


# ------------------------------------------------------------- scheduling, cancellation and overload
# A second server with tight scheduling parameters: one window per step (no batching), room for one long request
# plus one short one, and a Triton queue of two. Nothing here depends on how fast a step is: the long request
# (an hour of silence, three temperatures: random weights fail every quality check, so every window is decoded
# three times) would take 360 224-token decodes, far longer than any wait below, on any hardware; three and not
# more, because a step of the long job that is under way when its client cancels is decoded to its end.

LONG_SECONDS = 3600
TIGHT = {"max_windows_per_step": "1", "max_queued_audio_seconds": str(LONG_SECONDS + 30), "max_queue_size": "2"}


def flac_silence(seconds: int) -> bytes:
    """A small FLAC file of `seconds` of silence (long audio without a long upload)."""
    out = io.BytesIO()
    with av.open(out, "w", format="flac") as container:
        stream = container.add_stream("flac", rate=SAMPLE_RATE, layout="mono")
        block = np.zeros((1, 10 * SAMPLE_RATE), np.int16)
        for i in range(seconds // 10):
            frame = av.AudioFrame.from_ndarray(block, format="s16", layout="mono")
            frame.sample_rate, frame.pts = SAMPLE_RATE, i * block.shape[1]
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()


@pytest.fixture(scope="module", params=ENGINES)
def tight(request, repository, tmp_path_factory):
    """The exported whisper model under TIGHT parameters, without its warm-up (it only costs start time here), on
    its own server, served by each engine (ctranslate2: the same synthetic weights converted by the export,
    float32)."""
    exported = repository if request.param == "openai" else request.getfixturevalue("ct2_repository")
    repo = served_models(exported, tmp_path_factory.mktemp("tight_repository"), ("whisper",))
    config = repo / "whisper" / "config.pbtxt"
    text = config.read_text()
    for key, value in TIGHT.items():
        if key == "max_queue_size":
            text, n = re.subn(r"max_queue_size: \d+", f"max_queue_size: {value}", text)
        else:
            text, n = re.subn(rf'(key: "{key}" value {{ string_value: )"[^"]*"', rf'\1"{value}"', text)
        assert n == 1, key
    config.write_text(text)
    with serve(repo, tmp_path_factory.mktemp("tight_run")) as started:
        yield started


@pytest.fixture(scope="module")
def long_audio() -> bytes:
    return flac_silence(LONG_SECONDS)


QUEUED = metrics.WHISPER_QUEUED_AUDIO.name
STEPS = f"{metrics.WHISPER_STEP_WINDOWS.name}_count"
# Bounds on waits that must end, so a broken server fails the test with a message instead of hanging it (decoding
# the hour's FLAC and its log-mel, or two steps of three 224-token decodes, on a slow shared CPU: minutes at worst).
WAIT_S = 300.0


def start_long(server: Server, audio: bytes):
    """Send the long request asynchronously and wait until it is admitted (the queued-audio gauge, published at
    admission, shows its hour); returns (call context with cancel(), future of its error)."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    inputs = [grpcclient.InferInput("AUDIO", [1, 1], "BYTES"), grpcclient.InferInput("TEMPERATURE", [1, 3], "FP32")]
    inputs[0].set_data_from_numpy(np.array([[audio]], dtype=np.object_))
    inputs[1].set_data_from_numpy(np.array([[0.0, 0.4, 0.8]], np.float32))
    outcome = Future()
    context = client.async_infer("whisper", inputs, callback=lambda result, error: outcome.set_result(error))
    wait_until(lambda: outcome.done() or whisper_total(worker_metrics(server), QUEUED) == LONG_SECONDS,
               f"the long request admitted (queued audio at {LONG_SECONDS} s)", WAIT_S)
    assert not outcome.done(), f"the long request was answered instead of admitted: {outcome.result()}"
    return context, outcome


def test_fair_scheduling_and_cancellation_on_the_server(tight, clips, long_audio):
    """With one window per step, a short request sent once the long one is admitted is answered while the long
    one runs (round-robin: within two steps). Then the long one's client cancels it: the server drops the job
    within the next steps (its hour had over a hundred to go), answers it CANCELLED and releases its audio, so a
    35 s request that only fits without the long one's hour is served."""
    context, outcome = start_long(tight, long_audio)
    short = Client(tight.grpc_url, timeout=300).transcribe(clips["en"], temperature=GREEDY)
    running = worker_metrics(tight)
    assert short.text.strip() and not outcome.done()
    assert whisper_total(running, QUEUED) == LONG_SECONDS, "the long job must still be held"
    cancelled = whisper_total(running, ERRORS, code="CANCELLED")

    def released() -> Snapshot | None:
        now = worker_metrics(tight)
        gone = whisper_total(now, QUEUED) == 0 and whisper_total(now, ERRORS, code="CANCELLED") == cancelled + 1
        return now if gone else None

    context.cancel()
    cancelled_at = time.monotonic()
    left = wait_until(released, "the cancelled job answered CANCELLED by the server and its hour released", WAIT_S)
    seconds, steps = time.monotonic() - cancelled_at, whisper_total(left, STEPS) - whisper_total(running, STEPS)
    print(f"\nthe cancelled job left the worker {seconds:.1f} s and {steps:.0f} steps after its client cancelled")
    # at most: a step that ended after the scrape above, the step in progress, the step in which it leaves
    assert steps <= 3, f"the cancelled job stayed {steps:.0f} steps"
    assert outcome.result(timeout=60) is not None  # the client saw its call end too
    bigger = np.concatenate([clips["en"]] * 5)  # 35 s: 3600 + 35 > 3630 while the long job is held
    result = Client(tight.grpc_url, timeout=300).transcribe(bigger, temperature=GREEDY)
    assert result.text.strip() and tight.is_ready()


def test_overload_is_refused_fast_and_clearly(tight, clips, long_audio):
    """The long request holds the admitted audio; of 24 more, at most one is admitted, 16 (one execute batch) wait
    for admission and two wait in Triton's queue, until their clients give up; every other one is refused at once
    with Triton's clear "Exceeds maximum queue size"."""
    context, outcome = start_long(tight, long_audio)
    client = Client(tight.grpc_url, timeout=10)

    def call(_):
        start = time.monotonic()
        try:
            client.transcribe(clips["noise"][:SAMPLE_RATE], temperature=GREEDY)
            return "served", time.monotonic() - start
        except TridentError as exc:
            return str(exc), time.monotonic() - start

    with ThreadPoolExecutor(24) as pool:
        outcomes = list(pool.map(call, range(24)))
    context.cancel()
    outcome.result(timeout=60)
    refused = [seconds for message, seconds in outcomes if "maximum queue size" in message]
    assert len(refused) >= 24 - 1 - 16 - 2, f"only {len(refused)} refused with 'maximum queue size': {outcomes}"
    assert max(refused) < 5, outcomes  # refused at once, not after the 10 s timeout
    assert all(message == "served" or "maximum queue size" in message or "Deadline" in message
               for message, _ in outcomes), outcomes
    assert tight.is_ready()
    # Served again once the queue drained: the requests left in it leave as execute reaches them (cancelled).
    deadline = time.monotonic() + 120
    while True:
        try:
            assert Client(tight.grpc_url, timeout=300).transcribe(clips["en"], temperature=GREEDY).text.strip()
            break
        except TridentError as exc:
            assert "maximum queue size" in str(exc) and time.monotonic() < deadline, exc
            time.sleep(1)


def _jpeg() -> bytes:
    return (DATA / "ocr_en_sign.jpg").read_bytes()


@pytest.mark.parametrize("inputs, message", [
    (lambda: {"AUDIO": b""}, "AUDIO is empty"),
    (lambda: {"AUDIO": _jpeg()}, r"AUDIO could not be decoded as audio \(11433 bytes starting b'\\xff\\xd8\\xff\\xe0"
                                 r".*: it is not a WAV, FLAC, MP3, OGG/Opus or M4A/AAC file, or its header is damaged"),
    (lambda: {"AUDIO": (DATA / "speech_en.mp3").read_bytes()[:4000]}, "AUDIO is truncated"),
    (lambda: {"PCM": np.zeros(0, np.float32)}, "PCM is empty"),
    (lambda: {"PCM": np.array([0.0, np.nan] * 800, np.float32)}, "NaN"),
    (lambda: {"PCM": np.zeros(1600, np.float32), "LANGUAGE": "xx"}, "'xx'"),
    # echoed values are cut: a 10 kB message over gRPC arrived as "Stream removed" (found by make fuzz)
    (lambda: {"PCM": np.zeros(1600, np.float32), "LANGUAGE": "x" * 10000}, r"'x{40}'… \(10000 characters\)"),
    (lambda: {"PCM": np.zeros(1600, np.float32), "TASK": "summarize"}, "'summarize'"),
    (lambda: {"PCM": np.zeros(1600, np.float32), "AUDIO": (DATA / "speech_en.wav").read_bytes()}, "exactly one"),
    (lambda: {"LANGUAGE": "en"}, "exactly one"),
    (lambda: {"PCM": np.zeros(1600, np.float32), "TEMPERATURE": np.array([-1.0], np.float32)},
     r"TEMPERATURE must hold 1 to 10 values in \[0, 2\] tried in turn, got \(-1.0,\)"),
])
def test_bad_input_gets_clear_errors(client, triton, inputs, message):
    request = {}
    for name, value in inputs().items():
        if isinstance(value, np.ndarray):
            request[name] = value.reshape(1, -1)
        else:
            request[name] = np.array([[value.encode() if isinstance(value, str) else value]], dtype=object)
    with pytest.raises(InvalidInputError, match=message):
        client.infer("whisper", request, ["TEXT"])
    assert triton.is_ready()
