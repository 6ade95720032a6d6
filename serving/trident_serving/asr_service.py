"""The Whisper model's serving loop without Triton: admission, the worker thread, liveness and shutdown.

`Transcriber.submit()` (called from Triton's `execute`) validates a request and admits it once the audio already
held by unfinished jobs leaves room for it (`max_queued_audio_seconds`): until then `execute` waits, the excess
stays in Triton's own queue, and that queue's `max_queue_size` turns overload into fast UNAVAILABLE rejections
instead of unbounded memory. One worker thread steps the Scheduler and is the only thread that answers admitted
jobs, including on shutdown, so nothing is answered twice. The worker survives any error of a step; should it
stop anyway, every waiting and later request fails at once with UNAVAILABLE and `on_dead` is called (the model
ends its stub there, so Triton and the supervisor see the model as down and reload it).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import numpy as np

from .asr import FRAMES_PER_SECOND, ASROptions, Job, Scheduler, asked
from .audio import MAX_SECONDS, SAMPLE_RATE
from .errors import Cancelled, Unavailable

log = logging.getLogger("trident")
WINDOW_SECONDS = 30.0
POLL_SECONDS = 0.2  # how often a request waiting for admission checks whether its client gave up


@dataclass(frozen=True)
class ServiceOptions:
    """The `whisper` model's scheduling parameters (config.pbtxt `parameters`, as strings there)."""

    max_windows_per_step: int = 16  # 30 s windows decoded per step, all requests together; 1: no batching
    max_queued_audio_seconds: float = 4 * 3600.0  # audio held by admitted requests (each counts >= 30 s)
    max_audio_seconds: float = MAX_SECONDS  # one request's audio: longer is refused (a stated length, unread)

    @classmethod
    def from_parameters(cls, parameters: dict) -> "ServiceOptions":
        """Read the options from config parameters; a malformed value raises ValueError naming it."""
        values = {}
        for name, kind in (("max_windows_per_step", int), ("max_queued_audio_seconds", float),
                           ("max_audio_seconds", float)):
            if parameters.get(name, "") != "":
                try:
                    values[name] = kind(parameters[name])
                except ValueError:
                    raise ValueError(f"whisper parameter {name} must be a number, got {parameters[name]!r}") from None
                if values[name] < 1:
                    raise ValueError(f"whisper parameter {name} must be at least 1, got {parameters[name]!r}")
        return cls(**values)


def held_seconds(samples: int) -> float:
    """The audio seconds a job of `samples` holds (`Job.seconds`): its length, at least one 30 s window."""
    frames = samples // (SAMPLE_RATE // FRAMES_PER_SECOND)
    return max(frames / FRAMES_PER_SECOND, WINDOW_SECONDS)


class Transcriber:
    """Admission plus the worker thread around a Scheduler; `respond(job)` answers a finished job."""

    def __init__(self, scheduler: Scheduler, respond: Callable[[Job], None],
                 max_queued_audio_seconds: float = ServiceOptions.max_queued_audio_seconds,
                 on_dead: Optional[Callable[[BaseException], None]] = None,
                 on_step: Optional[Callable[[], None]] = None, on_admit: Optional[Callable[[], None]] = None):
        self.scheduler = scheduler
        self.respond = respond
        # Where the model publishes its metrics: on_step is called by the worker after each step, before it answers
        # that step's jobs (a client that has its answer sees its step); on_admit by `submit` once a job is admitted.
        self.on_step, self.on_admit = on_step, on_admit
        self.max_queued_audio_seconds = max_queued_audio_seconds
        self.on_dead = on_dead
        self.changed = threading.Condition()  # guards the flags below; notified whenever one changes
        self.stopping = False  # finalize asked the worker to stop
        self.stopped = False  # the worker has stopped (asked or not) and answered every admitted job
        self.failure: Optional[BaseException] = None  # why the worker died, if it did
        self.reserved = 0.0  # seconds of audio admitted but still being added
        self.worker = threading.Thread(target=self._run, name="whisper-scheduler", daemon=True)

    def start(self) -> None:
        self.worker.start()

    def submit(self, audio: np.ndarray, options: ASROptions, tag: Any = None,
               cancelled: Optional[Callable[[], bool]] = None) -> Job:
        """Admit one audio, waiting while the held audio is at its limit; the job is answered via `respond`.

        Raises InvalidInput (bad options), Unavailable (unloading, or the worker stopped) or Cancelled (the client
        gave up while waiting); the request is then not admitted and the caller answers it."""
        self.scheduler.check(options)  # fail bad options before waiting
        seconds = held_seconds(len(audio))
        with self.changed:
            while True:
                self._check_available()
                held = self.scheduler.stats.queued_audio_seconds + self.reserved
                if held == 0 or held + seconds <= self.max_queued_audio_seconds:
                    break  # a request longer than the whole limit still runs, alone
                if cancelled is not None and asked(cancelled):
                    raise Cancelled("the client gave up while the request waited for admission")
                self.changed.wait(POLL_SECONDS)
            self.reserved += seconds
        try:
            job = self.scheduler.add(audio, options, tag, cancelled)
        finally:
            with self.changed:
                self.reserved -= seconds
                self.changed.notify_all()
        with self.changed:
            if self.stopped and self.scheduler.remove([job]):
                self._check_available()  # the worker stopped before it could see this job: not admitted
        _notify(self.on_admit)
        return job

    def _check_available(self) -> None:
        """Raise Unavailable unless the worker takes jobs (call with `changed` held)."""
        if self.failure is not None or (self.stopped and not self.stopping):
            raise Unavailable(f"whisper's worker thread stopped ({type(self.failure).__name__}: {self.failure}); "
                              "the model must be reloaded")
        if self.stopping or self.stopped:
            raise Unavailable("the whisper model is being unloaded")

    def _run(self) -> None:
        """The worker: step while there are jobs, answer each one when it finishes."""
        try:
            while True:
                with self.changed:
                    self.changed.wait_for(lambda: self.stopping or not self.scheduler.idle)
                    if self.stopping:
                        break
                try:
                    finished = self.scheduler.step()
                except Exception as exc:  # noqa: BLE001 - step() fails single jobs itself; this is the backstop
                    log.exception("whisper step failed outside any job")
                    with self.scheduler.lock:
                        head = self.scheduler.jobs[: self.scheduler.max_windows]
                    finished = self.scheduler.remove(head, exc)  # those jobs fail rather than loop forever
                _notify(self.on_step)  # before answering
                self._answer(finished)
                with self.changed:
                    self.changed.notify_all()
        except BaseException as exc:  # noqa: BLE001 - recorded: waiting and later requests fail with it
            self.failure = exc
            log.critical("whisper's worker thread died: %s: %s", type(exc).__name__, exc)
        finally:
            with self.changed:
                self.stopped = True
                self.changed.notify_all()
            try:
                self._check_available()
            except Unavailable as exc:
                self._answer(self.scheduler.remove(list(self.scheduler.jobs), exc))
        if self.failure is not None and self.on_dead is not None:
            self.on_dead(self.failure)

    def _answer(self, jobs: List[Job]) -> None:
        for job in jobs:
            try:
                self.respond(job)
            except Exception:  # noqa: BLE001 - one response that cannot be built or sent must not stop the worker
                log.exception("could not answer a whisper request")

    @property
    def alive(self) -> bool:
        """Whether requests are being served (the worker runs and the model is not unloading)."""
        return self.worker.is_alive() and not self.stopping

    def close(self, timeout: float = 300.0) -> None:
        """Stop the worker after its current step; it answers every unfinished job with UNAVAILABLE."""
        with self.changed:
            self.stopping = True
            self.changed.notify_all()
        if self.worker.ident is not None:
            self.worker.join(timeout)
            if self.worker.is_alive():
                log.warning("whisper's worker is still in a step after %.0f s; it answers its jobs when done", timeout)
        else:
            self._run()  # never started: answer anything queued, from this thread


def _notify(callback: Optional[Callable[[], None]]) -> None:
    """Call a metrics callback; its failure is logged, never raised (metrics must not fail requests or the worker)."""
    if callback is not None:
        try:
            callback()
        except Exception:  # noqa: BLE001
            log.exception("a whisper metrics callback failed")
