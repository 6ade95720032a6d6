"""SRT and WebVTT subtitles from a transcript.

The rules (common broadcast practice, e.g. Netflix's and the BBC's timed-text guidelines):
* at most 42 characters a line and 2 lines a cue; a cue's text is broken into balanced lines between words,
  preferring a break after punctuation; a single word longer than a line is cut into line-long pieces;
* a segment too long for one cue is split between words, at the word timestamps, into as few cues as fit; among
  those splits, cuts after punctuation, no cue under 20 characters or 1 s, then even lengths are preferred; without
  word timestamps, the segment's time is shared out over its words in proportion to their length;
* a cue lasts 1 to 7 seconds: a shorter one is held longer when the next cue leaves room, a longer one ends at
  7 s (a segment over 7 s is split into several cues);
* cues never overlap and are at least 0.08 s (two frames at 25 fps) apart: a cue ends that long before the next
  one starts, and when the next one starts sooner than that after this one's start, it is delayed.
Cues never span two segments. WebVTT text escapes &, < and > (they would start entities or tags); SubRip has no
escapes, so "-->" in the text is written "->" there.
"""
from __future__ import annotations

import math
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
SHORT_CUE = 20  # characters: a shorter cue cut from a longer segment is avoided
BRIEFEST = 0.2  # seconds a cue stays when the next one starts at the same moment (whisper's words can)
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
    """The fewest cues that fit `tokens` (dynamic programming over the cuts between words); among those, cuts
    after punctuation, no short leftover cue (under SHORT_CUE characters or MIN_DURATION), then balanced cues."""
    if not tokens:
        return []
    # best[end]: (cost, start of the last cue) of the best cues for tokens[:end]
    best: list[tuple[float, int]] = [(0.0, 0)] + [(math.inf, 0)] * len(tokens)
    for end in range(1, len(tokens) + 1):
        for start in range(end - 1, -1, -1):
            part = tokens[start:end]
            if len(part) > 1 and not _fits(part):
                break  # a longer part does not fit either
            characters = len("".join(t.text for t in part).strip())
            cost = best[start][0] + 1.0 + 0.1 * (characters / (MAX_LINE * MAX_LINES)) ** 2  # squares: balance
            if end < len(tokens) and not _CLAUSE_END.search(part[-1].text):
                cost += 0.3
            if len(part) < len(tokens) and (characters < SHORT_CUE or part[-1].end - part[0].start < MIN_DURATION):
                cost += 0.5
            if cost < best[end][0]:
                best[end] = (cost, start)
    cues, end = [], len(tokens)
    while end:
        start = best[end][1]
        cues.append(_cue(tokens[start:end]))
        end = start
    return cues[::-1]


def _fits(tokens: list[_Token]) -> bool:
    return tokens[-1].end - tokens[0].start <= MAX_DURATION and wrap([t.text for t in tokens]) is not None


def _cue(tokens: list[_Token]) -> Cue:
    lines = wrap([t.text for t in tokens])
    assert lines, "a cue is one word of at most a line, or words that _fits"
    return Cue(tokens[0].start, tokens[-1].end, lines)


def _retime(cue_list: list[Cue]) -> list[Cue]:
    ordered = sorted(cue_list, key=lambda c: c.start)
    for i, cue in enumerate(ordered):
        following = ordered[i + 1] if i + 1 < len(ordered) else None
        end = min(max(cue.end, cue.start + MIN_DURATION), cue.start + MAX_DURATION)
        if following is not None:
            if following.start - MIN_GAP <= cue.start:  # next one starts at once: show this one briefly first
                following.start = cue.start + MIN_GAP + BRIEFEST
                following.end = max(following.end, following.start)
            end = min(end, following.start - MIN_GAP)
        cue.end = end
    return ordered


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
