"""Batched Whisper transcription with whisper.transcribe's rules, many audios per encoder and decoder call.

Each `Scheduler.step()` takes the current 30-second window of every unfinished audio, encodes them as one
batch and decodes them greedily as one batch with whisper's own `DecodingTask`; only the rows that fail
whisper's quality checks are decoded again at the next temperature. Every audio then advances exactly as in
`whisper.transcribe(..., condition_on_previous_text=False)`, so for the same weights and input the text and
segments are the same (up to floating-point near-ties between batch sizes). New audios can join at any step
and finished ones leave at once, which is what the Triton model needs for continuous batching.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import numpy as np
import torch
from whisper.audio import HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, log_mel_spectrogram, pad_or_trim
from whisper.decoding import DecodingOptions, DecodingResult, DecodingTask, detect_language
from whisper.model import Whisper
from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE, Tokenizer, get_tokenizer

from .errors import InvalidInput

INPUT_STRIDE = 2  # mel frames per output token (N_FRAMES // n_audio_ctx in every whisper model)
TIME_PRECISION = INPUT_STRIDE * HOP_LENGTH / SAMPLE_RATE  # seconds per timestamp token: 0.02
TASKS = ("transcribe", "translate")
MAX_TEMPERATURES = 10  # a fallback schedule longer than this only burns compute


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


class Job:
    """One audio being transcribed: its log-mel, its position (`seek`, in mel frames) and what it produced."""

    def __init__(self, mel: torch.Tensor, options: ASROptions, language: Optional[str], tag: Any = None):
        self.mel = mel  # (n_mels, frames + N_FRAMES), padded with 30 s of silence like whisper.transcribe's
        self.options = options
        self.language = language  # None until detected
        self.tag = tag  # the caller's handle, e.g. a Triton request
        self.content_frames = mel.shape[-1] - N_FRAMES
        self.seek = 0
        self.tokens: List[int] = []
        self.segments: List[dict] = []

    @property
    def done(self) -> bool:
        return self.language is not None and self.seek >= self.content_frames

    def window(self) -> Tuple[torch.Tensor, int]:
        """The current window's mel, zero-padded to 30 s, and the number of real frames in it."""
        size = min(N_FRAMES, self.content_frames - self.seek)
        return pad_or_trim(self.mel[:, self.seek : self.seek + size], N_FRAMES), size


class Scheduler:
    """Continuous batching of transcriptions: `add()` audios at any time, call `step()` until `idle`.

    `add()` and `remove()` may run in other threads than `step()`; jobs join the batch at the next step.
    """

    def __init__(self, model: Whisper, max_batch: int = 16, fp16: Optional[bool] = None):
        self.model = model
        self.max_batch = max_batch
        self.fp16 = model.device.type == "cuda" if fp16 is None else fp16  # fp16 on GPU, fp32 on CPU
        self.jobs: List[Job] = []  # oldest first
        self.lock = threading.Lock()  # guards `jobs`; held only to read or replace the list, not to compute

    @property
    def idle(self) -> bool:
        return not self.jobs

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self.fp16 else torch.float32

    def add(self, audio: np.ndarray, options: ASROptions = ASROptions(), tag: Any = None) -> Job:
        """Queue 16 kHz mono float32 `audio`; raises InvalidInput for an unknown language or task."""
        if options.task not in TASKS:
            raise InvalidInput(f"unknown task {options.task!r}: use one of {', '.join(TASKS)}")
        temperatures = np.asarray(options.temperatures, dtype=np.float64)
        if not 1 <= temperatures.size <= MAX_TEMPERATURES or not np.isfinite(temperatures).all() \
                or (temperatures < 0).any() or (temperatures > 2).any():
            raise InvalidInput(f"TEMPERATURE must hold 1 to {MAX_TEMPERATURES} values in [0, 2] tried in turn, "
                               f"got {options.temperatures}")
        language = self.language_code(options.language)
        # On the CPU, like whisper.transcribe, so the log-mel (normalised by its maximum over the whole audio)
        # and therefore every window are the same as the reference's.
        audio = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
        mel = log_mel_spectrogram(audio, self.model.dims.n_mels, padding=N_SAMPLES)
        job = Job(mel, options, language, tag)
        with self.lock:
            self.jobs.append(job)
        return job

    def remove(self, jobs: List[Job]) -> None:
        """Drop `jobs` (e.g. after a failed step) without finishing them."""
        with self.lock:
            self.jobs = [job for job in self.jobs if job not in jobs]

    def language_code(self, language: Optional[str]) -> Optional[str]:
        """The model's code for `language` (a code or an English name), None to detect; InvalidInput if unknown."""
        if not self.model.is_multilingual:
            if language not in (None, "en", "english"):
                raise InvalidInput(f"language {language!r} is not supported: this model is English-only")
            return "en"
        if language is None:
            return None
        known = tuple(LANGUAGES)[: self.model.num_languages]
        code = TO_LANGUAGE_CODE.get(language.lower(), language.lower())
        if code not in known:
            raise InvalidInput(f"unknown language {language!r}: use a code such as 'en', 'ko' or 'de' "
                               f"({len(known)} are supported), or none to detect it")
        return code

    def tokenizer(self, job: Job) -> Tokenizer:
        return get_tokenizer(self.model.is_multilingual, num_languages=self.model.num_languages,
                             language=job.language, task=job.options.task)

    def result(self, job: Job) -> dict:
        """A finished job's result, as whisper.transcribe returns it: text, segments and language."""
        return {"text": self.tokenizer(job).decode(job.tokens), "segments": job.segments, "language": job.language}

    @torch.no_grad()
    def step(self) -> List[Job]:
        """Advance the oldest `max_batch` jobs by one window each; return the jobs that finished."""
        with self.lock:
            jobs = self.jobs[: self.max_batch]
        active = [job for job in jobs if job.seek < job.content_frames]
        windows = [job.window() for job in active]
        # whisper.transcribe detects the language on the first 30 s of the silence-padded mel; that is the
        # first window itself unless the audio is shorter, in which case it is encoded separately.
        detecting = [job for job in jobs if job.language is None]
        extra = [job for job in detecting if job.content_frames < N_FRAMES]
        mels = [mel for mel, _ in windows] + [job.mel[:, :N_FRAMES] for job in extra]
        if mels:
            features = self.model.encoder(torch.stack(mels).to(self.model.device, self.dtype))
        if detecting:
            rows = [len(active) + extra.index(job) if job in extra else active.index(job) for job in detecting]
            _, probs = detect_language(self.model, features[rows])
            for job, p in zip(detecting, probs):
                job.language = max(p, key=p.get)
        if active:
            results = self.decode_with_fallback(active, features[: len(active)])
            for job, (_, size), result in zip(active, windows, results):
                self.advance(job, result, size)
        finished = [job for job in jobs if job.done]
        self.remove(finished)
        return finished

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
                options = DecodingOptions(language=jobs[rows[0]].language, temperature=temperature,
                                          sample_len=sample_len, fp16=self.fp16)
                prompts = [(jobs[i].language, jobs[i].options.task) for i in rows]
                for i, result in zip(rows, RowwiseDecodingTask(self.model, options, prompts).run(features[rows])):
                    results[i] = result
            pending = [i for i in pending if needs_fallback(results[i], jobs[i].options)]
        return results

    def advance(self, job: Job, result: DecodingResult, size: int) -> None:
        """Append the window's segments and move `seek`, as whisper.transcribe does after each window."""
        o = job.options
        if o.no_speech_threshold is not None:
            should_skip = result.no_speech_prob > o.no_speech_threshold
            if o.logprob_threshold is not None and result.avg_logprob > o.logprob_threshold:
                should_skip = False  # confident text despite the no-speech probability
            if should_skip:
                job.seek += size
                return
        segments, job.seek = window_segments(result, job.seek, size, self.tokenizer(job))
        for segment in segments:  # an instantaneous or blank segment keeps its times but loses its text
            if segment["start"] == segment["end"] or segment["text"].strip() == "":
                segment["text"], segment["tokens"] = "", []
        job.segments.extend({"id": i, **s} for i, s in enumerate(segments, start=len(job.segments)))
        job.tokens.extend(token for segment in segments for token in segment["tokens"])


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
    single_timestamp_ending = is_timestamp[-2:] == [False, True]  # no speech after the last timestamp

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
    if single_timestamp_ending:
        slices.append(len(tokens))
    segments, last = [], 0
    for current in slices:
        piece = tokens[last:current]
        start, end = (time_offset + (piece[i] - begin) * TIME_PRECISION for i in (0, -1))
        segments.append(segment(start, end, piece))
        last = current
    if single_timestamp_ending:
        return segments, seek + size
    return segments, seek + (tokens[last - 1] - begin) * INPUT_STRIDE  # the unfinished segment is decoded again


def transcribe_many(model: Whisper, audios: List[np.ndarray], options: ASROptions = ASROptions(),
                    max_batch: int = 16) -> List[dict]:
    """Transcribe `audios` (16 kHz mono float32) together; whisper.transcribe's result dict for each."""
    scheduler = Scheduler(model, max_batch=max_batch)
    jobs = [scheduler.add(audio, options) for audio in audios]
    while not scheduler.idle:
        scheduler.step()
    return [scheduler.result(job) for job in jobs]
