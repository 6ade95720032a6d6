"""Whisper scheduling without Triton: fairness, cancellation, failing steps, admission, a dead or stopping worker,
on each engine (openai-whisper and CTranslate2 run the same Scheduler).

Everything is counted in steps or decided by the scheduler's own state, never by sleeping: the tiny synthetic
model decodes at most a few tokens per window (`sample_len`), so each test takes seconds on a CPU.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
import whisper

from export.whisper import ctranslate2_model, synthetic_checkpoint
from trident_serving.asr import ASROptions, Scheduler
from trident_serving.asr_ct2 import ENGINES, CTranslate2Whisper, scheduler_for
from trident_serving.asr_service import ServiceOptions, Transcriber, held_seconds
from trident_serving.audio import SAMPLE_RATE
from trident_serving.batching import run_in_halves
from trident_serving.errors import Cancelled, InvalidInput, Unavailable

pytestmark = pytest.mark.whisper
FAST = ASROptions(temperatures=(0.0,), sample_len=2)  # greedy, two tokens per window: cheap and deterministic


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    return 0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SAMPLE_RATE)).astype(np.float32)


@pytest.fixture(scope="module")
def openai_model():
    return whisper.load_model(str(synthetic_checkpoint("tiny", seed=0)), device="cpu")


@pytest.fixture(scope="module", params=ENGINES)
def model(request, openai_model):
    """The same synthetic whisper tiny on each engine (the scheduling is the same Scheduler's)."""
    if request.param == "openai":
        return openai_model
    return CTranslate2Whisper(ctranslate2_model(synthetic_checkpoint("tiny", seed=0)), compute_type="float32")


def run_to_end(scheduler: Scheduler) -> list:
    finished = []
    while not scheduler.idle:
        finished += scheduler.step()
    return finished


# ------------------------------------------------------------------------------------------- fairness


def test_short_job_finishes_after_a_bounded_number_of_steps(model):
    """More long jobs than the window budget, then a short one: round-robin serves it within ceil(5 / 2) steps.

    Taking the oldest jobs first (as before) would make the short job wait until the long ones finish."""
    scheduler = scheduler_for(model, max_windows=2)
    longs = [scheduler.add(noise(95, seed), FAST) for seed in range(4)]  # four windows each
    assert scheduler.step() == [] and scheduler.stats.last_step_windows == 2
    short = scheduler.add(noise(5, 9), FAST)
    for step in range(1, 4):
        finished = scheduler.step()
        assert scheduler.stats.last_step_windows == 2  # the budget, never more
        if short in finished:
            break
    assert short in finished and short.error is None, "the short job must finish within 3 steps"
    assert not any(job.done for job in longs)
    # every long job has advanced by now too: nobody waits more than ceil(jobs / budget) steps for a turn
    assert all(job.seek > 0 for job in longs)


def test_windows_split_among_ctranslate2_replicas_decode_as_one_call():
    """A step's windows split among three CPU replicas (parts of 2, 1 and 2 rows, each with its own prompts: the
    languages differ) give what one worker decoding them in one call gives."""
    checkpoint = ctranslate2_model(synthetic_checkpoint("tiny", seed=0))
    results = []
    for replicas in (1, 3):
        scheduler = scheduler_for(CTranslate2Whisper(checkpoint, compute_type="float32", replicas=replicas))
        assert scheduler.model.replicas == replicas
        jobs = [scheduler.add(noise(40, seed), ASROptions(language=("en", "ko")[seed % 2], temperatures=(0.0,),
                                                           sample_len=8)) for seed in range(5)]
        scheduler.step()
        assert scheduler.stats.last_step_windows == 5
        run_to_end(scheduler)
        results.append([scheduler.result(job)["segments"] for job in jobs])
    exact = ("seek", "start", "end", "text", "tokens", "temperature")
    assert [[{k: s[k] for k in exact} for s in job] for job in results[0]] == \
        [[{k: s[k] for k in exact} for s in job] for job in results[1]]
    # the scores are float sums over rows of other lengths: equal to float32 rounding
    scores = [[[s[k] for k in ("avg_logprob", "no_speech_prob", "compression_ratio")] for s in job] for job in results[1]]
    np.testing.assert_allclose(scores, [[[s[k] for k in ("avg_logprob", "no_speech_prob", "compression_ratio")]
                                         for s in job] for job in results[0]], rtol=1e-5, atol=1e-6)


def test_one_window_per_step_is_no_batching(model):
    scheduler = scheduler_for(model, max_windows=1)
    jobs = [scheduler.add(noise(3, seed), FAST) for seed in range(3)]
    while not scheduler.idle:
        scheduler.step()
        assert scheduler.stats.last_step_windows <= 1
    assert scheduler.stats.steps == 3 and all(job.error is None for job in jobs)
    with pytest.raises(ValueError, match="max_windows"):
        scheduler_for(model, max_windows=0)


def test_service_options_from_config_parameters():
    assert ServiceOptions.from_parameters({}) == ServiceOptions()
    assert ServiceOptions().max_audio_seconds == 7200  # audio.MAX_SECONDS: two hours unless configured
    options = ServiceOptions.from_parameters({"max_windows_per_step": "1", "max_queued_audio_seconds": "90",
                                              "max_audio_seconds": "60"})
    assert (options.max_windows_per_step, options.max_queued_audio_seconds, options.max_audio_seconds) == (1, 90, 60)
    with pytest.raises(ValueError, match="max_windows_per_step"):
        ServiceOptions.from_parameters({"max_windows_per_step": "many"})
    with pytest.raises(ValueError, match="at least 1"):
        ServiceOptions.from_parameters({"max_windows_per_step": "0"})
    with pytest.raises(ValueError, match="max_audio_seconds must be a number, got 'two hours'"):
        ServiceOptions.from_parameters({"max_audio_seconds": "two hours"})


def test_log_mel_is_stored_compactly_without_changing_a_window(openai_model):
    """Only the frames that are read are kept, in the encoder's dtype: float16 for an fp16 (GPU) encoder, which
    whisper.transcribe also feeds float16 windows, float32 otherwise."""
    audio = noise(65)
    mel = whisper.log_mel_spectrogram(torch.from_numpy(audio), padding=whisper.audio.N_SAMPLES)
    for fp16, dtype in ((False, torch.float32), (True, torch.float16)):
        job = Scheduler(openai_model, fp16=fp16).add(audio, FAST)
        assert job.mel.dtype == dtype and job.mel.shape[-1] == 6500 and job.seconds == 65
        job.seek = 6000  # the last, partial window
        window, size = job.window()
        expected = whisper.pad_or_trim(mel[:, 6000:6500], 3000).to(dtype)
        assert size == 500 and torch.equal(window, expected)


# --------------------------------------------------------------------------------------- cancellation


def test_cancelled_job_leaves_without_using_a_window(model):
    scheduler = scheduler_for(model, max_windows=4)
    gave_up = threading.Event()
    doomed = scheduler.add(noise(95), FAST, cancelled=gave_up.is_set)
    other = scheduler.add(noise(65, 1), FAST)
    scheduler.step()
    assert doomed.seek > 0 and scheduler.stats.windows == 2
    gave_up.set()
    finished = scheduler.step()
    assert finished == [doomed] and isinstance(doomed.error, Cancelled)
    assert scheduler.stats.last_step_windows == 1 and scheduler.stats.cancelled_jobs == 1
    assert [job.error for job in run_to_end(scheduler)] == [None] and other.done
    assert scheduler.stats.active_jobs == 0 and scheduler.stats.queued_audio_seconds == 0


# -------------------------------------------------------------------------------------- failing steps


class FaultyEncoder:
    """The scheduler's real encoder, failing like a GPU would: out of memory above `max_rows` inputs, or on a
    constant input (silent audio's language-detection input, standing in for an input that breaks a kernel)."""

    def __init__(self, encode, max_rows: int = 64, poison_silence: bool = False):
        self.encode, self.max_rows, self.poison_silence = encode, max_rows, poison_silence
        self.calls: list[int] = []

    def __call__(self, scheduler: Scheduler, mel: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(mel))
        if len(mel) > self.max_rows:
            raise RuntimeError(f"CUDA out of memory (simulated for {len(mel)} windows)")
        if self.poison_silence and bool((mel.flatten(1).std(dim=1) == 0).any()):
            raise RuntimeError("kernel failure (simulated on a silent window)")
        return self.encode(scheduler, mel)


@pytest.fixture
def faulty(model, monkeypatch):
    """Installs a FaultyEncoder as the encoder of `model`'s scheduler class (for the test)."""
    engine = type(scheduler_for(model))

    def install(**kw) -> FaultyEncoder:
        encoder = FaultyEncoder(engine.encode, **kw)
        monkeypatch.setattr(engine, "encode", lambda scheduler, mel: encoder(scheduler, mel))
        return encoder
    return install


def summary(result: dict) -> tuple:
    """What must not depend on the batch: text, language, and each segment's window, times and tokens."""
    segments = [(s["seek"], s["start"], s["end"], s["tokens"]) for s in result["segments"]]
    return result["text"], result["language"], segments


def transcripts(model, audios: list) -> list:
    scheduler = scheduler_for(model, max_windows=len(audios))
    jobs = [scheduler.add(audio, FAST) for audio in audios]
    run_to_end(scheduler)
    return [job.error or summary(scheduler.result(job)) for job in jobs]


@pytest.fixture(scope="module")
def clean(model) -> tuple:
    """Four 4 s clips and their transcripts from a step without faults."""
    audios = [noise(4, seed) for seed in range(4)]
    return audios, transcripts(model, audios)


def test_out_of_memory_step_is_retried_smaller(model, faulty, clean):
    audios, expected = clean
    encoder = faulty(max_rows=2)
    assert transcripts(model, audios) == expected  # every job served, with the same results
    # four windows plus four language-detection inputs (the clips are under 30 s), halved until they fit
    assert encoder.calls[:3] == [8, 4, 2]


def test_a_job_that_fails_alone_fails_alone(model, faulty, clean):
    audios = [clean[0][0], np.zeros(4 * SAMPLE_RATE, np.float32), *clean[0][2:]]
    expected = [clean[1][0], *clean[1][2:]]
    faulty(poison_silence=True)
    scheduler = scheduler_for(model, max_windows=4)
    jobs = [scheduler.add(audio, FAST) for audio in audios]
    assert set(map(id, scheduler.step())) == set(map(id, jobs))
    assert "simulated" in str(jobs[1].error)
    assert [summary(scheduler.result(job)) for job in jobs[:1] + jobs[2:]] == expected
    assert scheduler.stats.failed_jobs == 1 and scheduler.stats.retries >= 2


def test_run_in_halves_isolates_a_bad_item():
    calls = []

    def run(items):
        calls.append(len(items))
        if 13 in items:
            raise ValueError("item 13 breaks post-processing")
        return [item * 10 for item in items]

    out = run_in_halves(list(range(64)), run)
    assert out[:13] == [i * 10 for i in range(13)] and out[14:] == [i * 10 for i in range(14, 64)]
    assert isinstance(out[13], ValueError)
    assert len(calls) <= 2 * 6 + 1  # about 2·log2(64) smaller runs, not 64
    assert run_in_halves([], run) == [] and isinstance(run_in_halves([1], lambda items: [])[0], RuntimeError)


# ---------------------------------------------------------------------------- admission and the worker


class Answers:
    """A `respond` that records each job it is given; `wait(n)` blocks until n jobs are answered."""

    def __init__(self):
        self.jobs: list = []
        self.changed = threading.Condition()

    def __call__(self, job) -> None:
        with self.changed:
            self.jobs.append(job)
            self.changed.notify_all()

    def wait(self, count: int, timeout: float = 120) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: len(self.jobs) >= count, timeout)


def admitted_at_once(transcriber: Transcriber, audio: np.ndarray, what: str, bound: float = 10.0):
    """`transcriber.submit(audio)` that is expected not to wait: its `cancelled` turns true after `bound` seconds,
    so a wrong admission rule fails the test with a clear message instead of hanging it."""
    deadline = time.monotonic() + bound
    try:
        return transcriber.submit(audio, FAST, cancelled=lambda: time.monotonic() > deadline)
    except Cancelled:
        pytest.fail(f"{what} was not admitted within {bound:.0f} s")


def test_admission_counts_audio_seconds_not_jobs(model):
    """60 s of room: two 30 s jobs are admitted, a third waits (here: its client gives up while it waits)."""
    published = []  # the queued audio each time the model is told a job was admitted (it publishes the gauges)
    transcriber = Transcriber(scheduler_for(model), Answers(), max_queued_audio_seconds=60,  # worker not started
                              on_admit=lambda: published.append(transcriber.scheduler.stats.queued_audio_seconds))
    assert held_seconds(5 * SAMPLE_RATE) == 30 and held_seconds(95 * SAMPLE_RATE) == 95
    first = admitted_at_once(transcriber, noise(5), "the first 30 s of 60")
    admitted_at_once(transcriber, noise(20, 1), "the second 30 s of 60")
    assert transcriber.scheduler.stats.queued_audio_seconds == 60 and published == [30, 60]
    with pytest.raises(Cancelled):
        transcriber.submit(noise(1, 2), FAST, cancelled=lambda: True)  # could not be admitted
    assert transcriber.scheduler.stats.active_jobs == 2 and published == [30, 60]
    while not first.done:
        transcriber.scheduler.step()
    transcriber.submit(noise(1, 2), FAST, cancelled=lambda: True)  # room again: admitted at once
    big = Transcriber(scheduler_for(model), Answers(), max_queued_audio_seconds=60)
    # longer than the whole limit: runs alone rather than never (a wrong rule would wait for ever)
    admitted_at_once(big, noise(95), "a request longer than max_queued_audio_seconds, to an empty transcriber,")
    with pytest.raises(InvalidInput, match="unknown task 'summarize': use one of transcribe, translate"):
        big.submit(noise(1), ASROptions(task="summarize"))


def test_worker_survives_a_failing_step_and_answers_everyone(model):
    answers = Answers()
    scheduler = scheduler_for(model)
    published = []  # answers given when each step's metrics were published
    transcriber = Transcriber(scheduler, answers, on_step=lambda: published.append(len(answers.jobs)))
    real_step, failures = scheduler.step, [RuntimeError("bookkeeping bug (simulated)")]

    def step():
        if failures:
            raise failures.pop()
        return real_step()

    scheduler.step = step
    broken = transcriber.submit(noise(2), FAST)
    transcriber.start()
    assert answers.wait(1) and "simulated" in str(broken.error)
    assert published[0] == 0, "a step's metrics must be published before its jobs are answered"
    later = [transcriber.submit(noise(2, seed), FAST) for seed in (1, 2)]
    assert answers.wait(3) and transcriber.alive
    transcriber.close()
    assert all(job.error is None for job in later)
    assert sorted(map(id, answers.jobs)) == sorted(map(id, [broken, *later]))  # each answered exactly once


def test_dead_worker_fails_requests_fast(model):
    died = threading.Event()
    answers = Answers()
    scheduler = scheduler_for(model)
    transcriber = Transcriber(scheduler, answers, on_dead=lambda exc: died.set())

    def step():
        raise SystemExit("the worker thread ends (simulated)")

    scheduler.step = step
    queued = transcriber.submit(noise(2), FAST)
    transcriber.start()
    assert died.wait(60) and answers.wait(1, timeout=0)
    assert answers.jobs == [queued] and isinstance(queued.error, Unavailable)
    assert not transcriber.alive
    with pytest.raises(Unavailable, match="worker thread stopped .*SystemExit"):
        transcriber.submit(noise(2), FAST)  # at once, not after a hang
    assert scheduler.idle


def test_close_answers_unfinished_jobs_once(model):
    answers = Answers()
    transcriber = Transcriber(scheduler_for(model, max_windows=1), answers)
    jobs = [transcriber.submit(noise(65, seed), FAST) for seed in range(3)]
    transcriber.start()
    transcriber.close()
    assert answers.wait(3, timeout=0) and sorted(map(id, answers.jobs)) == sorted(map(id, jobs))
    assert all(isinstance(job.error, Unavailable) for job in jobs if job.error is not None)
    assert any(isinstance(job.error, Unavailable) for job in jobs)  # three long jobs cannot finish in one step
    with pytest.raises(Unavailable, match="unloaded"):
        transcriber.submit(noise(1), FAST)
