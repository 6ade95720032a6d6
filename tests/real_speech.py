"""Shared by the real-weights tests: the espeak-ng clips, their truth, faster-whisper's transcripts, error rates.

faster-whisper (CTranslate2, the original weights of the converted Whisper base) is the reference library; its
greedy transcripts are computed once per test session and shared by tests/test_ctranslate2.py and
tests/test_whisper_real.py.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from whisper.normalizers import EnglishTextNormalizer

from trident_serving.audio import decode_audio

DATA = Path(__file__).resolve().parent / "data"
TRUTH: dict[str, dict] = json.loads((DATA / "real_speech.json").read_text())


def language_of(name: str) -> str | None:
    """The language a clip is decoded with: detected for English (tests check it), given for Korean."""
    return TRUTH[name]["language"] if TRUTH[name]["language"] != "en" else None


def load_clip(name: str) -> np.ndarray:
    return decode_audio((DATA / f"real_{name}.flac").read_bytes())


def edit_distance(a: list, b: list) -> int:
    """Levenshtein distance between two sequences (of words, tokens or characters)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def error_rate(pairs: list[tuple[list[str], list[str]]]) -> float:
    """Edits over reference length, summed over (reference, hypothesis) pairs."""
    return sum(edit_distance(ref, hyp) for ref, hyp in pairs) / sum(len(ref) for ref, _ in pairs)


def english_words(text: str) -> list[str]:
    """The words of an English text after whisper's EnglishTextNormalizer ("Dr." and "Doctor" agree)."""
    return EnglishTextNormalizer()(text).split()


@dataclass(frozen=True)
class Reference:
    text: str
    language: str
    tokens: tuple[int, ...]  # text tokens only (timestamp tokens dropped)


@functools.lru_cache(maxsize=None)
def faster_whisper_transcripts() -> dict[str, Reference]:
    """faster-whisper's greedy transcripts of every clip, as the server decodes (timestamps, no conditioning)."""
    from faster_whisper import WhisperModel

    from export.whisper import offline_base_dir

    model = WhisperModel(str(offline_base_dir()), device="cpu", compute_type="float32", cpu_threads=2)
    eot = 50257  # tokens from here on are special or timestamps in the multilingual vocabulary
    found = {}
    for name in TRUTH:
        segments, info = model.transcribe(load_clip(name), language=language_of(name), beam_size=1,
                                          temperature=0.0, condition_on_previous_text=False, vad_filter=False)
        segments = list(segments)
        found[name] = Reference("".join(s.text for s in segments), info.language,
                                tuple(t for s in segments for t in s.tokens if t < eot))
    return found
