"""Per-frame results summarised over time: on-screen text events and per-class object counts.

Text read on consecutive analysed frames becomes one `TextEvent` when it is the *same text*:
* its normalised form (NFKC, case folded, only letters and digits kept: spacing and punctuation are what OCR
  varies most) is similar: difflib ratio >= 0.75, i.e. one character wrong in four survives ("EXIT" / "EX1T");
* at the same place: the centres of the two boxes' bounding rectangles are no farther apart than half the larger
  rectangle's diagonal, so slowly moving text is followed but the same word twice side by side stays two events.
*Consecutive*: the text is read again on the next analysed frame, at most 1.5 sample intervals later (fixed-rate
sampling; with scene sampling any next frame counts). A frame where OCR missed it therefore ends the event.
Each event takes at most one line per frame; a line joins the event it matches best (text similarity).
"""
from __future__ import annotations

import difflib
import math
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from ..results import TextLine
from .results import ClassCounts, Frame, ObjectCounts, TextEvent

SIMILARITY = 0.75
GAP_INTERVALS = 1.5


def normalise(text: str) -> str:
    """The text OCR readings are compared by: NFKC, case folded, letters and digits only."""
    return "".join(c for c in unicodedata.normalize("NFKC", text).casefold()
                   if unicodedata.category(c)[0] in "LN")


def similarity(a: str, b: str) -> float:
    """difflib's ratio of two normalised texts (1.0 when both are empty)."""
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() if a or b else 1.0


def same_place(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> bool:
    """Whether two text boxes (four corners each) mark the same spot: see the module docstring."""
    (ax, ay, adiag), (bx, by, bdiag) = _centre_and_diagonal(a), _centre_and_diagonal(b)
    return math.hypot(ax - bx, ay - by) <= max(adiag, bdiag) / 2


def _centre_and_diagonal(box: list[tuple[float, float]]) -> tuple[float, float, float]:
    xs, ys = [x for x, _ in box], [y for _, y in box]
    return (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, math.hypot(max(xs) - min(xs), max(ys) - min(ys))


@dataclass
class _OpenEvent:
    best: TextLine
    last: TextLine
    start: float
    end: float
    position: int  # where in the frame sequence it was last read
    frames: list[int] = field(default_factory=list)

    def matches(self, line: TextLine, key: str) -> float:
        """Similarity of `line` to this event's best or latest reading, 0 when it is elsewhere in the frame."""
        if not same_place(self.last.box, line.box):
            return 0.0
        score = max(similarity(normalise(self.best.text), key), similarity(normalise(self.last.text), key))
        return score if score >= SIMILARITY else 0.0


def text_events(frames: Sequence[Frame], interval: float | None) -> list[TextEvent]:
    """Merge the text lines of `frames` (time order) into events, ordered by start time.

    `interval`: the sample interval in seconds (1 / fps), or None when frames were sampled per scene."""
    if interval is not None and interval <= 0:
        raise ValueError(f"the sample interval must be positive seconds, got {interval}")
    max_gap = GAP_INTERVALS * interval if interval is not None else math.inf
    open_events: list[_OpenEvent] = []
    closed: list[_OpenEvent] = []
    for position, frame in enumerate(sorted(frames, key=lambda f: f.time)):
        alive = [e for e in open_events if e.position == position - 1 and frame.time - e.end <= max_gap]
        closed += [e for e in open_events if e not in alive]
        candidates = []  # (similarity, line score, line number, event number): best matches are taken first
        keys = [normalise(line.text) for line in frame.text]
        for i, line in enumerate(frame.text):
            for j, event in enumerate(alive):
                score = event.matches(line, keys[i])
                if score:
                    candidates.append((score, line.score, i, j))
        taken_lines, taken_events = set(), set()
        for _, _, i, j in sorted(candidates, reverse=True):
            if i in taken_lines or j in taken_events:
                continue
            taken_lines.add(i)
            taken_events.add(j)
            event, line = alive[j], frame.text[i]
            event.last, event.end, event.position = line, frame.time, position
            event.frames.append(frame.index)
            if line.score > event.best.score:
                event.best = line
        open_events = alive
        for i, line in enumerate(frame.text):
            if i not in taken_lines:
                open_events.append(_OpenEvent(line, line, frame.time, frame.time, position, [frame.index]))
    closed += open_events
    return [TextEvent(start=e.start, end=e.end, text=e.best.text, box=list(e.best.box), score=e.best.score,
                      frames=e.frames) for e in sorted(closed, key=lambda e: (e.start, e.frames[0], e.end))]


def object_counts(frames: Sequence[Frame]) -> ObjectCounts:
    """How many objects of each class every frame holds; classes ordered by total count, then class id."""
    ordered = sorted(frames, key=lambda f: f.time)
    per_frame = [Counter((d.class_id, d.label) for d in frame.detections) for frame in ordered]
    totals = sum(per_frame, Counter())
    classes = sorted(totals, key=lambda key: (-totals[key], key[0]))
    return ObjectCounts(times=[f.time for f in ordered],
                        classes=[ClassCounts(class_id, label, [counts[(class_id, label)] for counts in per_frame])
                                 for class_id, label in classes])
