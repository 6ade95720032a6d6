"""SRT and WebVTT subtitles from a transcript.

The rules (common broadcast practice, e.g. Netflix's and the BBC's timed-text guidelines):
* at most 42 characters a line and 2 lines a cue; a cue's text is broken into balanced lines between words,
  preferring a break after punctuation; a single word longer than a line is cut into line-long pieces;
* a segment too long for one cue is halved between words, at the word timestamps, until each part fits: as
  evenly as possible, but after punctuation when that is not much less even (sentences kept whole, no orphan
  words); without word timestamps, the segment's time is shared out over its words in proportion to length;
* a cue lasts 1 to 7 seconds: a shorter one is held longer when the next cue leaves room, a longer one ends at
  7 s (a segment over 7 s is split into several cues);
* cues never overlap and are at least 0.08 s (two frames at 25 fps) apart: a cue ends that long before the next
  one starts, and when the next one starts sooner than that after this one's start, it is delayed.
Cues never span two segments. WebVTT text escapes &, < and > (they would start entities or tags); SubRip has no
escapes, so "-->" in the text is written "->" there.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePath
from typing import Sequence

from ..results import Segment, Transcription

MAX_LINE = 42
MAX_LINES = 2
MIN_DURATION = 1.0
MAX_DURATION = 7.0
MIN_GAP = 0.08
_CLAUSE_END = re.compile(r"[.,!?;:\u3002\uff0c\uff01\uff1f]$")


@dataclass
class Cue:
    start: float
    end: float
    lines: list[str]


@dataclass
class _Token:
    text: str  # keeps its leading space, as whisper spells words
    start: float
    end: float


def cues(transcript: Transcription) -> list[Cue]:
    """The transcript's segments as cues that follow the module's rules."""
    built: list[Cue] = []
    for segment in transcript.segments:
        built += _segment_cues(_tokens(segment))
    return _retime(built)


def to_srt(cue_list: Sequence[Cue]) -> str:
    return "\n".join(f"{n}\n{_stamp(c.start, ',')} --> {_stamp(c.end, ',')}\n"
                     + "".join(line.replace("-->", "->") + "\n" for line in c.lines)
                     for n, c in enumerate(cue_list, start=1))


def to_vtt(cue_list: Sequence[Cue]) -> str:
    escape = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;"})
    return "WEBVTT\n\n" + "\n".join(f"{_stamp(c.start, '.')} --> {_stamp(c.end, '.')}\n"
                                    + "".join(line.translate(escape) + "\n" for line in c.lines)
                                    for c in cue_list)


def wrap(tokens: Sequence[str]) -> list[str] | None:
    """`tokens` (words with their leading spaces) as at most MAX_LINES balanced lines, or None if they don't fit."""
    text = "".join(tokens).strip()
    if len(text) <= MAX_LINE:
        return [text] if text else []
    best = None
    for k in range(1, len(tokens)):
        first, second = "".join(tokens[:k]).strip(), "".join(tokens[k:]).strip()
        if len(first) > MAX_LINE or len(second) > MAX_LINE or not first or not second:
            continue
        cost = max(len(first), len(second)) - (8 if _CLAUSE_END.search(first) else 0)
        if best is None or cost < best[0]:
            best = (cost, [first, second])
    return best[1] if best else None


def _tokens(segment: Segment) -> list[_Token]:
    """The segment's words (timed by whisper, or shared out over the segment), none longer than a line."""
    if segment.words:
        words = [_Token(w.word, w.start, w.end) for w in segment.words if w.word.strip()]
    else:
        texts = [(" " if i else "") + t for i, t in enumerate(segment.text.split())]
        total = sum(len(t) for t in texts) or 1
        words, at = [], segment.start
        for t in texts:
            length = (segment.end - segment.start) * len(t) / total
            words.append(_Token(t, at, at + length))
            at += length
    tokens = []
    for w in words:
        body = w.text.strip()
        if len(body) <= MAX_LINE:
            tokens.append(w)
            continue
        pieces = [body[i:i + MAX_LINE] for i in range(0, len(body), MAX_LINE)]
        step = (w.end - w.start) / len(pieces)
        tokens += [_Token((" " if i == 0 and w.text[:1].isspace() else "") + piece,
                          w.start + i * step, w.start + (i + 1) * step) for i, piece in enumerate(pieces)]
    return tokens


def _segment_cues(tokens: list[_Token]) -> list[Cue]:
    """Halve `tokens` until every part fits a cue: as evenly as possible by characters, but after punctuation
    when that costs at most a quarter of the text's balance (no orphan words, sentences kept whole)."""
    if not tokens:
        return []
    if len(tokens) == 1 or _fits(tokens):
        return [_cue(tokens)]
    lengths = [len(t.text) for t in tokens]
    total = sum(lengths)

    def cost(k: int) -> float:
        left = sum(lengths[:k])
        return abs(2 * left - total) / total - (0.25 if _CLAUSE_END.search(tokens[k - 1].text) else 0.0)

    cut = min(range(1, len(tokens)), key=cost)
    return _segment_cues(tokens[:cut]) + _segment_cues(tokens[cut:])


def _fits(tokens: list[_Token]) -> bool:
    return tokens[-1].end - tokens[0].start <= MAX_DURATION and wrap([t.text for t in tokens]) is not None


def _cue(tokens: list[_Token]) -> Cue:
    return Cue(tokens[0].start, tokens[-1].end, wrap([t.text for t in tokens]) or [])


def _retime(cue_list: list[Cue]) -> list[Cue]:
    ordered = sorted(cue_list, key=lambda c: c.start)
    for i, cue in enumerate(ordered):
        following = ordered[i + 1] if i + 1 < len(ordered) else None
        end = min(max(cue.end, cue.start + MIN_DURATION), cue.start + MAX_DURATION)
        if following is not None:
            if following.start - MIN_GAP <= cue.start:  # next one starts at once: show this one briefly first
                following.start = cue.start + MIN_GAP + _BRIEFEST
                following.end = max(following.end, following.start)
            end = min(end, following.start - MIN_GAP)
        cue.end = end
    return ordered


_BRIEFEST = 0.2  # how long a cue stays when the next one starts at the same moment (whisper times words to 0.02 s)


def _stamp(seconds: float, decimal_mark: str) -> str:
    millis = max(0, round(seconds * 1000))
    return (f"{millis // 3_600_000:02d}:{millis // 60_000 % 60:02d}:{millis // 1000 % 60:02d}"
            f"{decimal_mark}{millis % 1000:03d}")


def file_stems(paths: Sequence[str]) -> list[str]:
    """One distinct file-name stem per input ("clip", "clip-2", ... when names repeat, ignoring case as some file
    systems do), for its subtitle files."""
    stems: list[str] = []
    for path in paths:
        stem = PurePath(path).stem or "input"
        unique, n = stem, 1
        while unique.casefold() in {s.casefold() for s in stems}:
            n += 1
            unique = f"{stem}-{n}"
        stems.append(unique)
    return stems
