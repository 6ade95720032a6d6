"""Whisper on CTranslate2 inside trident_serving.asr's Scheduler: the same rules, another engine.

`CTranslate2Scheduler` keeps everything the Scheduler does (continuous batching, round-robin fairness,
whisper.transcribe's seek, temperature fallback and no-speech skipping, per-job failure, cancellation) and swaps
the three engine calls: the encoder, language detection and greedy (or sampled) decoding of a batch of windows
with per-row prompts run in CTranslate2 (`ctranslate2.models.Whisper`), at its compute type (int8 / float32 on
CPU, float16 / int8_float16 on GPU).

Semantic choices, each as openai-whisper's (so that both engines answer alike):
* the log-mel is whisper's own (`whisper.log_mel_spectrogram`, computed by the Scheduler), not faster-whisper's
  numpy front end, whose rounding differs slightly;
* at most `sample_len` (224) new tokens a window, as whisper's DecodingOptions; faster-whisper allows 448 less the
  prompt;
* the suppressed tokens of whisper's `suppress_tokens="-1"`, suppress_blank, the first timestamp within 1 s;
* `avg_logprob` as faster-whisper derives it from CTranslate2's length-normalised score (its sum over the tokens
  and end of text, divided by the token count + 1, as whisper's), `compression_ratio` on the stripped text.
* word timestamps: whisper.transcribe's (`whisper.timing.add_word_timestamps`: punctuation merging, the
  segment-boundary rules, the seek after the last word), with the token-to-frame path computed by CTranslate2's
  `align` (the model's alignment heads, median filter and DTW, as whisper's `find_alignment`) on the window's
  encoder output, as faster-whisper does.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import whisper.timing
from whisper.audio import TOKENS_PER_SECOND
from whisper.decoding import DecodingResult
from whisper.timing import WordTiming
from whisper.tokenizer import Tokenizer, get_tokenizer
from whisper.utils import compression_ratio

from .asr import ASROptions, Scheduler

ENGINES = ("openai", "ctranslate2")
SAMPLE_LEN = 224  # whisper's default DecodingOptions.sample_len (n_text_ctx // 2)
MAX_INITIAL_TIMESTAMP_INDEX = 50  # whisper's max_initial_timestamp of 1 s, in 0.02 s steps


@dataclass(frozen=True)
class Dims:
    n_mels: int


class CTranslate2Whisper:
    """A CTranslate2 Whisper model with the attributes the Scheduler reads of an openai-whisper `Whisper`.

    On a CPU it holds `replicas` workers of `threads` threads each (replicas 0: one per core this process may
    use, one thread each), sharing the weights, and the Scheduler splits each step's windows among them: two cores
    do more with two one-thread calls at once than with one call of two threads (CTranslate2 leaves a core idle
    in its serial parts; measured on this project's 2-core machine, 8 windows of Whisper base at int8: encoder
    3.21 s against 2.61 s, greedy decoding 1.02 s against 0.47 s). On a GPU: one worker."""

    def __init__(self, model_dir: str | Path, device: str = "cpu", compute_type: str = "default",
                 replicas: int = 0, threads: int = 1):
        import ctranslate2

        self.device = torch.device(device)
        index = self.device.index or 0
        self.replicas = (replicas or len(os.sched_getaffinity(0))) if self.device.type == "cpu" else 1
        self.ct2 = ctranslate2.models.Whisper(str(model_dir), device=self.device.type, device_index=index,
                                              compute_type=compute_type, inter_threads=self.replicas,
                                              intra_threads=threads if self.device.type == "cpu" else 0)
        # the threads that call the replicas at once (CTranslate2 releases the GIL while it computes)
        self.callers = ThreadPoolExecutor(self.replicas, "ctranslate2") if self.replicas > 1 else None
        self.dims = Dims(self.ct2.n_mels)
        self.is_multilingual = self.ct2.is_multilingual
        self.num_languages = self.ct2.num_languages
        self.compute_type = self.ct2.compute_type


class CTranslate2Scheduler(Scheduler):
    """trident_serving.asr.Scheduler running a CTranslate2Whisper."""

    def __init__(self, model: CTranslate2Whisper, max_windows: int = 16):
        # Windows stay float32 whatever the device: CTranslate2's compute type decides the arithmetic.
        super().__init__(model, max_windows=max_windows, fp16=False)

    def aligner(self) -> Any:
        return AlignedByCTranslate2(self.model)

    def spread(self, call: Callable[..., Any], rows: torch.Tensor, *per_row: Sequence) -> List[Any]:
        """`call(rows, *per_row)` on the model's replicas at once, the rows split into as many contiguous parts:
        the parts' results, in order."""
        parts = min(self.model.replicas, len(rows))
        if parts <= 1:
            return [call(rows, *per_row)]
        bounds = np.linspace(0, len(rows), parts + 1).round().astype(int)
        pieces = [(rows[a:b], *(values[a:b] for values in per_row)) for a, b in zip(bounds[:-1], bounds[1:])]
        return list(self.model.callers.map(lambda piece: call(*piece), pieces))

    def encode(self, mels: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.spread(self.encode_part, mels.to(self.model.device, torch.float32)))

    def encode_part(self, mels: torch.Tensor) -> torch.Tensor:
        output = self.model.ct2.encode(storage(mels))
        # Copies, owned by torch: the StorageView's memory is CTranslate2's.
        if output.device == "cuda":
            return torch.as_tensor(output, device=self.model.device).clone()
        return torch.from_numpy(np.array(output))

    def detect_languages(self, features: torch.Tensor) -> List[str]:
        # Each row's (token, probability) pairs, likeliest first; a token reads "<|en|>".
        return [pairs[0][0][2:-2] for pairs in self.model.ct2.detect_language(storage(features))]

    def decode(self, features: torch.Tensor, prompts: List[Tuple[str, str]], temperature: float,
               sample_len: Optional[int]) -> List[DecodingResult]:
        tokenizers = [get_tokenizer(self.model.is_multilingual, num_languages=self.model.num_languages,
                                    language=language, task=task) for language, task in prompts]
        sot_sequences = [list(tokenizer.sot_sequence) for tokenizer in tokenizers]
        tokenizer = tokenizers[0]  # the special tokens are the same whatever the language and task
        # whisper's DecodingTask._get_suppress_tokens for its default suppress_tokens="-1"
        suppress = sorted({*tokenizer.non_speech_tokens, tokenizer.transcribe, tokenizer.translate, tokenizer.sot,
                           tokenizer.sot_prev, tokenizer.sot_lm, tokenizer.no_speech})

        def generate(rows: torch.Tensor, prompts: Sequence[List[int]]) -> List[Any]:
            return self.model.ct2.generate(
                storage(rows), list(prompts), beam_size=1,
                max_length=len(sot_sequences[0]) + (sample_len or SAMPLE_LEN),
                return_scores=True, return_no_speech_prob=True, suppress_blank=True, suppress_tokens=suppress,
                max_initial_timestamp_index=MAX_INITIAL_TIMESTAMP_INDEX,
                # temperature 0: greedy; otherwise sampling from the whole distribution, as whisper does
                sampling_topk=1 if temperature == 0 else 0, sampling_temperature=temperature or 1.0)

        results = [result for part in self.spread(generate, features, sot_sequences) for result in part]
        decoded = []
        for (language, _), tokenizer, result in zip(prompts, tokenizers, results):
            tokens = list(result.sequences_ids[0])
            text = tokenizer.decode(tokens).strip()
            # CTranslate2's score is the log-probability sum (tokens and end of text) over the token count
            avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
            decoded.append(DecodingResult(audio_features=None, language=language, tokens=tokens, text=text,
                                          avg_logprob=avg_logprob, no_speech_prob=result.no_speech_prob,
                                          temperature=temperature, compression_ratio=compression_ratio(text)))
        return decoded


@dataclass(frozen=True)
class AlignedByCTranslate2:
    """A CTranslate2 model as whisper.timing.find_alignment's `model`: `find_alignment` below aligns with it."""
    model: CTranslate2Whisper


def find_alignment(model: Any, tokenizer: Tokenizer, text_tokens: List[int], mel: torch.Tensor, num_frames: int,
                   **kwargs: Any) -> List[WordTiming]:
    """whisper.timing.find_alignment, which whisper.timing.add_word_timestamps looks up by name when it runs:
    the same word timings from CTranslate2's `align` for an `AlignedByCTranslate2` (`mel` is then the window's
    encoder output), whisper's own for any other model."""
    if not isinstance(model, AlignedByCTranslate2):
        return _whisper_find_alignment(model, tokenizer, text_tokens, mel, num_frames, **kwargs)
    if not text_tokens:
        return []
    # CTranslate2 adds <|notimestamps|> after the start sequence and <|endoftext|> after the text, as whisper.
    aligned = model.model.ct2.align(storage(mel.unsqueeze(0)), list(tokenizer.sot_sequence), [text_tokens],
                                    num_frames, median_filter_width=kwargs.get("median_filter_width", 7))[0]
    text_indices, time_indices = np.array(aligned.alignments).reshape(-1, 2).T
    words, word_tokens = tokenizer.split_to_word_tokens(text_tokens + [tokenizer.eot])
    if len(word_tokens) <= 1:  # the end of text alone
        return []
    # A word starts where the path first reaches its first token and ends where it reaches the next word's.
    boundaries = np.cumsum([0] + [len(tokens) for tokens in word_tokens])
    first_steps = np.diff(text_indices, prepend=-1) != 0
    step_times = time_indices[first_steps] / TOKENS_PER_SECOND
    probabilities = np.asarray(aligned.text_token_probs)
    return [WordTiming(word, tokens, step_times[start], step_times[end], float(probabilities[start:end].mean()))
            for word, tokens, start, end in zip(words, word_tokens, boundaries[:-2], boundaries[1:-1])]


_whisper_find_alignment = whisper.timing.find_alignment
whisper.timing.find_alignment = find_alignment


def scheduler_for(model: Any, max_windows: int = 16) -> Scheduler:
    """The Scheduler that runs `model`: an openai-whisper Whisper or a CTranslate2Whisper."""
    if isinstance(model, CTranslate2Whisper):
        return CTranslate2Scheduler(model, max_windows=max_windows)
    return Scheduler(model, max_windows=max_windows)  # fp16 on a GPU, fp32 on a CPU


def storage(tensor: torch.Tensor) -> Any:
    """A CTranslate2 StorageView over a tensor's memory (CPU through numpy, CUDA through its array interface)."""
    import ctranslate2

    tensor = tensor.contiguous()
    return ctranslate2.StorageView.from_array(tensor if tensor.is_cuda else tensor.numpy())
