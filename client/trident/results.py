"""Typed results returned by the client."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class Detection:
    """One detected object; `box` is (x1, y1, x2, y2) in original-image pixels."""

    box: tuple[float, float, float, float]
    score: float
    class_id: int
    label: str


@dataclass
class DetectResult:
    """All detections of one image, highest score first (as ultralytics orders them)."""

    detections: list[Detection] = field(default_factory=list)

    @property
    def boxes(self) -> np.ndarray:
        return np.array([d.box for d in self.detections], dtype=np.float32).reshape(-1, 4)

    @property
    def scores(self) -> np.ndarray:
        return np.array([d.score for d in self.detections], dtype=np.float32)

    @property
    def class_ids(self) -> np.ndarray:
        return np.array([d.class_id for d in self.detections], dtype=np.int32)

    def __len__(self) -> int:
        return len(self.detections)

    def to_dict(self) -> dict:
        return {"detections": [asdict(d) for d in self.detections]}


@dataclass
class Word:
    """One word of a segment (asked for with `word_timestamps=True`); times in seconds from the start of the audio.

    `word` keeps whisper's spelling: a leading space, attached punctuation ("Hello," and " world.")."""

    word: str
    start: float
    end: float
    probability: float  # the mean probability of the word's tokens


@dataclass
class Segment:
    """One transcribed segment; times in seconds from the start of the audio."""

    start: float
    end: float
    text: str
    avg_logprob: float | None = None
    no_speech_prob: float | None = None
    temperature: float | None = None  # the temperature the segment's window was decoded at (> 0: fell back)
    words: list[Word] = field(default_factory=list)  # empty unless word timestamps were asked for

    @classmethod
    def from_dict(cls, segment: dict) -> "Segment":
        """A segment of the `whisper` model's SEGMENTS JSON (keys it does not know are ignored)."""
        fields = {k: v for k, v in segment.items() if k in cls.__dataclass_fields__ and k != "words"}
        return cls(**fields, words=[Word(**w) for w in segment.get("words", [])])


@dataclass
class Transcription:
    """Speech recognition result of one audio file."""

    text: str
    language: str
    segments: list[Segment] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_srt(self) -> str:
        """The segments as SubRip subtitles."""

        def stamp(seconds: float) -> str:
            millis = int(round(seconds * 1000))
            return f"{millis // 3_600_000:02d}:{millis // 60_000 % 60:02d}:{millis // 1000 % 60:02d},{millis % 1000:03d}"

        blocks = [f"{i}\n{stamp(s.start)} --> {stamp(s.end)}\n{s.text.strip()}\n"
                  for i, s in enumerate(self.segments, start=1)]
        return "\n".join(blocks)


@dataclass
class TextLine:
    """One line of text read from an image; `box` holds the four corners (x, y) in original pixels."""

    box: list[tuple[float, float]]
    text: str
    score: float

    def to_dict(self) -> dict:
        return asdict(self)
