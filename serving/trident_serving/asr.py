"""Batched Whisper transcription with whisper.transcribe's rules, many audios per encoder and decoder call.

Each `Scheduler.step()` takes the current 30-second window of every unfinished audio, encodes them as one
batch and decodes them greedily as one batch with whisper's own `DecodingTask`; only the rows that fail
whisper's quality checks are decoded again at the next temperature. Every audio then advances exactly as in
`whisper.transcribe(..., condition_on_previous_text=False)`, so for the same weights and input the text and
segments are the same (up to floating-point near-ties between batch sizes). New audios can join at any step
and finished ones leave at once, which is what the Triton model needs for continuous batching.

Fairness: a step decodes at most `max_windows` windows, taken round-robin: the jobs of a step go to the back of
the line, so with N unfinished audios each one advances at least every ceil(N / max_windows) steps and a short
audio finishes after a bounded number of steps however many long ones run (shortest-remaining-first would
answer short audios sooner but can starve a long one forever under a steady stream of short ones).

Word timestamps (`ASROptions.word_timestamps`) are whisper.transcribe's too: after its window is decoded, each
such job's text is aligned by `whisper.timing.add_word_timestamps` on the encoder output the step already holds
(`EncodedWindow`), one job at a time, and its next window starts at its last word as in transcribe.

Failures stay local: a step that raises (e.g. CUDA out of memory) is retried in halves, down to one job, and
only a job that fails alone is failed (`Job.error`); a job whose caller gave up (`cancelled()`) leaves at the next
step without using a window.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import numpy as np
import torch
import whisper
from whisper.audio import HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, log_mel_spectrogram, pad_or_trim
from whisper.decoding import DecodingOptions, DecodingResult, DecodingTask, detect_language
from whisper.model import Whisper
from whisper.timing import add_word_timestamps
from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE, Tokenizer, get_tokenizer
from whisper.utils import get_end

from .errors import Cancelled, InvalidInput, shown

INPUT_STRIDE = 2  # mel frames per output token (N_FRAMES // n_audio_ctx in every whisper model)
TIME_PRECISION = INPUT_STRIDE * HOP_LENGTH / SAMPLE_RATE  # seconds per timestamp token: 0.02
TASKS = ("transcribe", "translate")
MAX_TEMPERATURES = 10  # a fallback schedule longer than this only burns compute
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # log-mel frames per second of audio: 100
ALIGNMENT_HEADS_KEY = "alignment_heads"  # the checkpoint key of the word-timestamp heads (see load_model)

log = logging.getLogger("trident")


@dataclass(frozen=True)
class ASROptions:
    """Options of one transcription; the defaults are whisper.transcribe's."""

    language: Optional[str] = None  # None: detected from the first 30 s, as whisper.transcribe does
    task: str = "transcribe"  # or "translate" (to English)
    temperatures: Tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # tried in turn while a window fails
    compression_ratio_threshold: Optional[float] = 2.4  # a window whose gzip ratio is above this fails
    logprob_threshold: Optional[float] = -1.0  # a window whose average log probability is below this fails
    no_speech_threshold: Optional[float] = 0.6  # a window this likely silent (and failing the above) is skipped
    sample_len: Optional[int] = None  # most tokens per window (DecodingOptions.sample_len); None: 224
    word_timestamps: bool = False  # add each segment's "words" (word, start, end, probability), as transcribe does


class Job:
    """One audio being transcribed: its log-mel, its position (`seek`, in mel frames) and what it produced."""

    def __init__(self, mel: torch.Tensor, options: ASROptions, language: Optional[str], tag: Any = None,
                 cancelled: Optional[Callable[[], bool]] = None, dtype: torch.dtype = torch.float32):
        # `mel` is whisper.transcribe's: the audio's frames then 30 s of padding silence. Windows read only the
        # audio's frames and language detection the first 30 s, so the padding beyond both is dropped. It is
        # kept in the encoder's dtype: an fp16 encoder is given float16 windows anyway (as in whisper.transcribe),
        # so float16 storage halves the memory without changing a value; an fp32 encoder keeps float32.
        self.content_frames = mel.shape[-1] - N_FRAMES
        self.mel = mel[:, : max(self.content_frames, N_FRAMES)].to(dtype, copy=True)
        self.options = options
        self.language = language  # None until detected
        self.tag = tag  # the caller's handle, e.g. a Triton request
        self.cancelled = cancelled  # returns True once the caller gave up; None: never
        self.seek = 0
        self.tokens: List[int] = []
        self.segments: List[dict] = []
        self.last_speech_timestamp = 0.0  # end of the latest word (word timestamps only), as in whisper.transcribe
        self.error: Optional[BaseException] = None  # set when the job failed or was cancelled

    @property
    def seconds(self) -> float:
        """Audio seconds this job holds in memory (at least 30: a window's worth), the admission measure."""
        return self.mel.shape[-1] / FRAMES_PER_SECOND

    @property
    def done(self) -> bool:
        return self.error is not None or (self.language is not None and self.seek >= self.content_frames)

    def window(self) -> Tuple[torch.Tensor, int]:
        """The current window's mel, zero-padded to 30 s, and the number of real frames in it."""
        size = min(N_FRAMES, self.content_frames - self.seek)
        return pad_or_trim(self.mel[:, self.seek : self.seek + size], N_FRAMES), size


@dataclass
class SchedulerStats:
    """Running totals and gauges of a Scheduler, for metrics; updated by the scheduler only."""

    active_jobs: int = 0  # admitted and not finished
    queued_audio_seconds: float = 0.0  # sum of `Job.seconds` of the active jobs
    steps: int = 0
    windows: int = 0  # windows decoded, all steps together
    last_step_windows: int = 0  # windows in the latest step
    fallbacks: int = 0  # windows decoded again at a higher temperature
    audio_seconds_transcribed: float = 0.0  # audio the finished windows covered
    retries: int = 0  # failed steps retried in halves
    failed_jobs: int = 0
    cancelled_jobs: int = 0


class Scheduler:
    """Continuous batching of transcriptions: `add()` audios at any time, call `step()` until `idle`.

    `add()` may run in other threads than `step()`; jobs join the line at the next step. `jobs` is in turn
    order: a step takes the first `max_windows` and puts the unfinished ones back at the end.
    """

    def __init__(self, model: Whisper, max_windows: int = 16, fp16: Optional[bool] = None):
        if max_windows < 1:
            raise ValueError(f"max_windows must be at least 1, got {max_windows}")
        self.model = model
        self.max_windows = max_windows  # windows per step (1: no batching), independent of Triton's batch size
        self.fp16 = model.device.type == "cuda" if fp16 is None else fp16  # fp16 on GPU, fp32 on CPU
        self.jobs: List[Job] = []
        self.lock = threading.Lock()  # guards `jobs` and `stats`; never held while computing
        self.stats = SchedulerStats()

    @property
    def idle(self) -> bool:
        return not self.jobs

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self.fp16 else torch.float32

    def check(self, options: ASROptions) -> Optional[str]:
        """Validate `options`; the language code (None: detect). Raises InvalidInput for a bad task,
        language or temperature schedule."""
        if options.task not in TASKS:
            raise InvalidInput(f"unknown task {shown(options.task)}: use one of {', '.join(TASKS)}")
        temperatures = np.asarray(options.temperatures, dtype=np.float64)
        if not 1 <= temperatures.size <= MAX_TEMPERATURES or not np.isfinite(temperatures).all() \
                or (temperatures < 0).any() or (temperatures > 2).any():
            raise InvalidInput(f"TEMPERATURE must hold 1 to {MAX_TEMPERATURES} values in [0, 2] tried in turn, "
                               f"got {options.temperatures}")
        return self.language_code(options.language)

    def add(self, audio: np.ndarray, options: ASROptions = ASROptions(), tag: Any = None,
            cancelled: Optional[Callable[[], bool]] = None) -> Job:
        """Queue 16 kHz mono float32 `audio`; raises InvalidInput for an unknown language or task.

        `cancelled`, if given, is asked before each of the job's steps; once it returns True the job leaves."""
        language = self.check(options)
        # On the CPU in float32, like whisper.transcribe, so the log-mel (normalised by its maximum over the
        # whole audio) and therefore every window are the same as the reference's; stored in the encoder's dtype.
        audio = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
        mel = log_mel_spectrogram(audio, self.model.dims.n_mels, padding=N_SAMPLES)
        job = Job(mel, options, language, tag, cancelled, dtype=self.dtype)
        with self.lock:
            self.jobs.append(job)
            self.stats.active_jobs += 1
            self.stats.queued_audio_seconds += job.seconds
        return job

    def remove(self, jobs: List[Job], error: Optional[BaseException] = None) -> List[Job]:
        """Drop `jobs` without finishing them, setting `error` on those that have none; returns those dropped."""
        gone = {id(job) for job in jobs}
        with self.lock:
            dropped = [job for job in self.jobs if id(job) in gone]
            self.jobs = [job for job in self.jobs if id(job) not in gone]
            for job in dropped:
                job.error = job.error or error or RuntimeError("the job was removed")
            self._released(dropped)
        return dropped

    def _released(self, jobs: List[Job]) -> None:
        """Stats of jobs that left the line (call with the lock held)."""
        self.stats.active_jobs -= len(jobs)
        self.stats.queued_audio_seconds -= sum(job.seconds for job in jobs)
        if not self.jobs:
            self.stats.queued_audio_seconds = 0.0  # no float drift when empty
        self.stats.failed_jobs += sum(job.error is not None and not isinstance(job.error, Cancelled) for job in jobs)
        self.stats.cancelled_jobs += sum(isinstance(job.error, Cancelled) for job in jobs)

    def language_code(self, language: Optional[str]) -> Optional[str]:
        """The model's code for `language` (a code or an English name), None to detect; InvalidInput if unknown."""
        if not self.model.is_multilingual:
            if language is not None and language.lower() not in ("en", "english"):
                raise InvalidInput(f"language {shown(language)} is not supported: this model is English-only")
            return "en"
        if language is None:
            return None
        known = tuple(LANGUAGES)[: self.model.num_languages]
        code = TO_LANGUAGE_CODE.get(language.lower(), language.lower())
        if code not in known:
            raise InvalidInput(f"unknown language {shown(language)}: use a code such as 'en', 'ko' or 'de' "
                               f"({len(known)} are supported), or none to detect it")
        return code

    def tokenizer(self, job: Job) -> Tokenizer:
        return get_tokenizer(self.model.is_multilingual, num_languages=self.model.num_languages,
                             language=job.language, task=job.options.task)

    def result(self, job: Job) -> dict:
        """A finished job's result, as whisper.transcribe returns it: text, segments and language."""
        return {"text": self.tokenizer(job).decode(job.tokens), "segments": job.segments, "language": job.language}

    def step(self) -> List[Job]:
        """Advance the next `max_windows` jobs by one window each; return the jobs that finished.

        A finished job either succeeded (`error` is None: see `result()`), failed, or was cancelled."""
        with self.lock:
            batch = self.jobs[: self.max_windows]
        for job in batch:
            if job.cancelled is not None and asked(job.cancelled):
                job.error = Cancelled("the client cancelled the request or its timeout expired")
        running = [job for job in batch if job.error is None]
        before = {id(job): job.seek for job in running}
        if running:
            self._run(running)
        finished = [job for job in batch if job.done]
        taken = {id(job) for job in batch}
        with self.lock:  # round-robin: this step's unfinished jobs go to the back, behind those added meanwhile
            self.jobs = [job for job in self.jobs if id(job) not in taken] + [job for job in batch if not job.done]
            self._released(finished)
            self.stats.steps += 1
            self.stats.last_step_windows = len(running)
            self.stats.windows += len(running)
            self.stats.audio_seconds_transcribed += sum(
                max(job.seek - before[id(job)], 0) for job in running) / FRAMES_PER_SECOND
        return finished

    def _run(self, jobs: List[Job]) -> None:
        """One window of `jobs`; if that raises, the same in halves, so only a job that fails alone fails."""
        try:
            self._advance_all(jobs)
            return
        except Exception as exc:  # noqa: BLE001 - any failure is retried smaller, then becomes the job's error
            if len(jobs) == 1:
                jobs[0].error = exc
                return
            log.warning("a whisper step of %d windows failed (%s: %s): retrying in halves",
                        len(jobs), type(exc).__name__, exc)
        # Outside the except block, so that the failed attempt's tensors are freed before the retry.
        with self.lock:
            self.stats.retries += 1
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()
        half = len(jobs) // 2
        self._run(jobs[:half])
        self._run(jobs[half:])

    @torch.no_grad()
    def _advance_all(self, jobs: List[Job]) -> None:
        """Encode, detect languages and decode the current window of `jobs`, then advance each one.

        Nothing is advanced until every window is decoded, so a retry after an exception starts clean (a
        detected language is kept: detection is deterministic)."""
        active = [job for job in jobs if job.seek < job.content_frames]
        windows = [job.window() for job in active]
        # whisper.transcribe detects the language on the first 30 s of the silence-padded mel; that is the
        # first window itself unless the audio is shorter, in which case it is encoded separately.
        detecting = [job for job in jobs if job.language is None]
        extra = [job for job in detecting if job.content_frames < N_FRAMES]
        mels = [mel for mel, _ in windows] + [job.mel[:, :N_FRAMES] for job in extra]
        if mels:
            features = self.encode(torch.stack(mels))
        if detecting:
            rows = [len(active) + extra.index(job) if job in extra else active.index(job) for job in detecting]
            for job, language in zip(detecting, self.detect_languages(features[rows])):
                job.language = language
        results = self.decode_with_fallback(active, features[: len(active)]) if active else []
        for row, (job, (_, size), result) in enumerate(zip(active, windows, results)):
            try:
                self.advance(job, result, size, features[row])
            except Exception as exc:  # noqa: BLE001 - that job alone fails; the others' windows are done
                job.error = exc

    def decode_with_fallback(self, jobs: List[Job], features: torch.Tensor) -> List[DecodingResult]:
        """Decode all windows at their first temperature, then only the failed ones at the next, and so on."""
        results: List[Optional[DecodingResult]] = [None] * len(jobs)
        pending = list(range(len(jobs)))
        for attempt in range(max(len(job.options.temperatures) for job in jobs)):
            pending = [i for i in pending if attempt < len(jobs[i].options.temperatures)]
            groups: dict = {}  # rows decoded together share the temperature and the length limit
            for i in pending:
                groups.setdefault((jobs[i].options.temperatures[attempt], jobs[i].options.sample_len), []).append(i)
            for (temperature, sample_len), rows in groups.items():
                prompts = [(jobs[i].language, jobs[i].options.task) for i in rows]
                for i, result in zip(rows, self.decode(features[rows], prompts, temperature, sample_len)):
                    results[i] = result
            pending = [i for i in pending if needs_fallback(results[i], jobs[i].options)]
            with self.lock:  # rows decoded again at the next temperature
                self.stats.fallbacks += sum(attempt + 1 < len(jobs[i].options.temperatures) for i in pending)
        return results

    # The engine: openai-whisper's own modules here; trident_serving.asr_ct2 runs CTranslate2 instead.
    def encode(self, mels: torch.Tensor) -> torch.Tensor:
        """The encoder output of a batch of 30 s log-mel windows."""
        return self.model.encoder(mels.to(self.model.device, self.dtype))

    def detect_languages(self, features: torch.Tensor) -> List[str]:
        """The likeliest language code of each encoded window."""
        _, probs = detect_language(self.model, features)
        return [max(p, key=p.get) for p in probs]

    def decode(self, features: torch.Tensor, prompts: List[Tuple[str, str]], temperature: float,
               sample_len: Optional[int]) -> List[DecodingResult]:
        """Decode encoded windows, each with its (language, task) prompt, at one temperature."""
        options = DecodingOptions(language=prompts[0][0], temperature=temperature, sample_len=sample_len,
                                  fp16=self.fp16)
        return RowwiseDecodingTask(self.model, options, prompts).run(features)

    def aligner(self) -> Any:
        """What whisper.timing.find_alignment gets as its model: the decoder over an already encoded window."""
        return EncodedWindow(self.model)

    def advance(self, job: Job, result: DecodingResult, size: int, features: torch.Tensor) -> None:
        """Append the window's segments and move `seek`, as whisper.transcribe does after each window.

        `features` is the window's encoder output, which the word alignment reuses."""
        o = job.options
        if o.no_speech_threshold is not None:
            should_skip = result.no_speech_prob > o.no_speech_threshold
            if o.logprob_threshold is not None and result.avg_logprob > o.logprob_threshold:
                should_skip = False  # confident text despite the no-speech probability
            if should_skip:
                job.seek += size
                return
        tokenizer = self.tokenizer(job)
        segments, seek = window_segments(result, job.seek, size, tokenizer)
        if o.word_timestamps:
            seek = self.add_words(job, segments, seek, size, features, tokenizer, result.tokens)
        job.seek = seek
        for segment in segments:  # an instantaneous or blank segment keeps its times but loses its text
            if segment["start"] == segment["end"] or segment["text"].strip() == "":
                segment["text"], segment["tokens"] = "", []
                if o.word_timestamps:
                    segment["words"] = []
        job.segments.extend({"id": i, **s} for i, s in enumerate(segments, start=len(job.segments)))
        job.tokens.extend(token for segment in segments for token in segment["tokens"])

    def add_words(self, job: Job, segments: List[dict], seek: int, size: int, features: torch.Tensor,
                  tokenizer: Tokenizer, tokens: List[int]) -> int:
        """Add whisper's word timings to one window's `segments` and return the next seek, as
        whisper.transcribe(word_timestamps=True) does: `whisper.timing.add_word_timestamps` (cross-attention of
        the alignment heads, DTW, punctuation merging; it also moves segment starts and ends onto the words),
        then, unless the window ends on a single timestamp, the next window starts at the last word's end."""
        time_offset = job.seek * HOP_LENGTH / SAMPLE_RATE
        add_word_timestamps(segments=segments, model=self.aligner(), tokenizer=tokenizer,
                            mel=features, num_frames=size, last_speech_timestamp=job.last_speech_timestamp)
        last_word_end = get_end(segments)
        if not single_timestamp_ending(tokens, tokenizer) and last_word_end is not None \
                and last_word_end > time_offset:
            seek = round(last_word_end * FRAMES_PER_SECOND)
        if last_word_end is not None:
            job.last_speech_timestamp = last_word_end
        return seek


class EncodedWindow:
    """The Whisper model as `whisper.timing.find_alignment` uses it, for a window the step already encoded.

    find_alignment runs `model(mel, tokens)`, i.e. the encoder again on the window's mel, then the decoder with
    hooks on its cross-attention. Given this wrapper and the window's encoder output in place of the mel, it runs
    only the decoder: the same alignment (the encoder output is that of the same window, computed in the step's
    batch) without encoding every window twice. Everything else is the model's own."""

    def __init__(self, model: Whisper):
        self.model = model

    def __getattr__(self, name: str) -> Any:  # dims, device, decoder, alignment_heads
        return getattr(self.model, name)

    def __call__(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.decoder(tokens, features)


class RowwiseDecodingTask(DecodingTask):
    """whisper's DecodingTask with each row's language and task tokens given (the rest is shared)."""

    def __init__(self, model: Whisper, options: DecodingOptions, prompts: List[Tuple[str, str]]):
        super().__init__(model, options)
        self.prompts = prompts  # (language, task) per row

    def _detect_language(self, audio_features: torch.Tensor, tokens: torch.Tensor):
        # The hook where DecodingTask writes detected language tokens; write each row's sot sequence instead.
        for row, (language, task) in enumerate(self.prompts):
            sot_sequence = get_tokenizer(self.model.is_multilingual, num_languages=self.model.num_languages,
                                         language=language, task=task).sot_sequence
            tokens[row, self.sot_index : self.sot_index + len(sot_sequence)] = torch.tensor(sot_sequence)
        return [language for language, _ in self.prompts], None


def needs_fallback(result: DecodingResult, o: ASROptions) -> bool:
    """whisper.transcribe's test for decoding a window again at the next temperature."""
    too_repetitive = (o.compression_ratio_threshold is not None
                      and result.compression_ratio > o.compression_ratio_threshold)
    improbable = o.logprob_threshold is not None and result.avg_logprob < o.logprob_threshold
    silent = o.no_speech_threshold is not None and result.no_speech_prob > o.no_speech_threshold and improbable
    return (too_repetitive or improbable) and not silent


def window_segments(result: DecodingResult, seek: int, size: int, tokenizer: Tokenizer) -> Tuple[List[dict], int]:
    """Split one window's tokens into segments at timestamp pairs and find the next seek (whisper.transcribe)."""
    tokens, begin = result.tokens, tokenizer.timestamp_begin
    time_offset = float(seek * HOP_LENGTH / SAMPLE_RATE)
    is_timestamp = [token >= begin for token in tokens]
    ends_single = single_timestamp_ending(tokens, tokenizer)

    def segment(start: float, end: float, piece: List[int]) -> dict:
        return {"seek": seek, "start": start, "end": end,
                "text": tokenizer.decode([t for t in piece if t < tokenizer.eot]), "tokens": piece,
                "temperature": result.temperature, "avg_logprob": result.avg_logprob,
                "compression_ratio": result.compression_ratio, "no_speech_prob": result.no_speech_prob}

    slices = [i + 1 for i in range(len(tokens) - 1) if is_timestamp[i] and is_timestamp[i + 1]]
    if not slices:  # at most single timestamps: one segment, ending at the last timestamp if any
        timestamps = [token for token in tokens if token >= begin]
        duration = size * HOP_LENGTH / SAMPLE_RATE
        if timestamps and timestamps[-1] != begin:
            duration = (timestamps[-1] - begin) * TIME_PRECISION
        return [segment(time_offset, time_offset + duration, tokens)], seek + size
    if ends_single:
        slices.append(len(tokens))
    segments, last = [], 0
    for current in slices:
        piece = tokens[last:current]
        start, end = (time_offset + (piece[i] - begin) * TIME_PRECISION for i in (0, -1))
        segments.append(segment(start, end, piece))
        last = current
    if ends_single:
        return segments, seek + size
    return segments, seek + (tokens[last - 1] - begin) * INPUT_STRIDE  # the unfinished segment is decoded again


def single_timestamp_ending(tokens: List[int], tokenizer: Tokenizer) -> bool:
    """Whether a window's tokens end on a lone timestamp: no speech after it (whisper.transcribe)."""
    return [token >= tokenizer.timestamp_begin for token in tokens[-2:]] == [False, True]


def load_model(checkpoint: str) -> Whisper:
    """whisper.load_model of a checkpoint file, on the CPU, with the alignment heads it carries.

    whisper.load_model sets a model's alignment heads (the cross-attention heads word timestamps read) only when
    given an official model name; from a file it keeps the default, every head of the decoder's last half. So
    `python -m export whisper` stores them in the checkpoint, under "alignment_heads", in the form
    `Whisper.set_alignment_heads` takes (official weights: whisper's own entry for that size; a converted
    CTranslate2 model: its config.json's); a checkpoint without them (synthetic weights) keeps the default."""
    model = whisper.load_model(checkpoint, device="cpu")
    heads = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True).get(ALIGNMENT_HEADS_KEY)
    if heads is not None:
        model.set_alignment_heads(heads)
    return model


def transcribe_many(model: Whisper, audios: List[np.ndarray], options: ASROptions = ASROptions(),
                    max_windows: int = 16) -> List[dict]:
    """Transcribe `audios` (16 kHz mono float32) together; whisper.transcribe's result dict for each."""
    scheduler = Scheduler(model, max_windows=max_windows)
    jobs = [scheduler.add(audio, options) for audio in audios]
    while not scheduler.idle:
        for job in scheduler.step():
            if job.error is not None:
                raise job.error
    return [scheduler.result(job) for job in jobs]


def asked(cancelled: Callable[[], bool]) -> bool:
    """`cancelled()`, False if asking fails (e.g. the server is shutting down: the answer then fails anyway)."""
    try:
        return bool(cancelled())
    except Exception:  # noqa: BLE001
        return False
