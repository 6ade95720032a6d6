"""The results model of `trident analyze`: plain dataclasses, written as `analysis.json` (schema.json).

Detections, text lines and transcript segments are the client's own result types (`trident.results`). Frame
thumbnails live only in memory, for report.html: analysis.json does not carry them.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
from dataclasses import asdict, dataclass, field

from ..results import Detection, Segment, TextLine, Transcription

SCHEMA = "trident.analysis/1"
KINDS = ("video", "audio", "image")


@dataclass
class MediaInfo:
    """What the container says about one input; `width`/`height` are the displayed frame size (rotation applied),
    the coordinate space of every box. Audio-only inputs have no size or fps; images have no duration."""

    duration: float | None
    has_video: bool
    has_audio: bool
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    video_codec: str | None = None
    audio_codec: str | None = None


@dataclass
class Frame:
    """One analysed frame: `index` counts the video's frames from 0 (0 for an image), `time` is its presentation
    time in seconds. `thumbnail` (a small JPEG) is for the report only and is not compared or serialised."""

    index: int
    time: float
    detections: list[Detection] = field(default_factory=list)
    text: list[TextLine] = field(default_factory=list)
    thumbnail: bytes | None = field(default=None, repr=False, compare=False)


@dataclass
class TextEvent:
    """The same on-screen text read on consecutive analysed frames (see `events.text_events`): `text`, `box` and
    `score` are the best-scoring reading; `start`/`end` the times of the first and last frame it was read on."""

    start: float
    end: float
    text: str
    box: list[tuple[float, float]]
    score: float
    frames: list[int]  # the `Frame.index` of every frame it was read on


@dataclass
class ClassCounts:
    """How many objects of one class each analysed frame holds (aligned with `ObjectCounts.times`)."""

    class_id: int
    label: str
    counts: list[int]


@dataclass
class ObjectCounts:
    """Per-class counts over time: one series per class seen, most frequent class first."""

    times: list[float] = field(default_factory=list)
    classes: list[ClassCounts] = field(default_factory=list)


@dataclass
class Timings:
    """Seconds spent on one input: decoding, each model's requests (summed client-side latencies), wall time."""

    decode: float = 0.0
    models: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0


@dataclass
class FileAnalysis:
    """Everything found in one input file. A failed input keeps its `error` and whatever was done before."""

    path: str
    kind: str | None = None  # one of KINDS; None when the file could not be identified
    media: MediaInfo | None = None
    transcript: Transcription | None = None
    frames: list[Frame] = field(default_factory=list)
    text_events: list[TextEvent] = field(default_factory=list)
    object_counts: ObjectCounts = field(default_factory=ObjectCounts)
    notes: list[str] = field(default_factory=list)  # e.g. "no audio track: no transcript"
    error: str | None = None
    timings: Timings = field(default_factory=Timings)

    def __post_init__(self):
        if self.kind is not None and self.kind not in KINDS:
            raise ValueError(f"{self.path}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")


@dataclass
class Server:
    """The server the analysis ran against; `models` maps each model name to the version that answered."""

    url: str
    protocol: str
    models: dict[str, str] = field(default_factory=dict)


@dataclass
class Options:
    """How frames were sampled (`fps` frames per second, or one per scene), the transcription language and
    Whisper's temperatures (None: the server's schedule; [0]: greedy, faster and the same every run)."""

    fps: float | None = None
    scenes: bool = False
    language: str | None = None  # None: detected per input
    temperature: list[float] | None = None

    def __post_init__(self):
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be a positive number of frames per second, got {self.fps}")
        if self.fps is not None and self.scenes:
            raise ValueError("sample frames either at a fixed rate (fps) or per scene, not both")

    @property
    def interval(self) -> float | None:
        """Seconds between sampled frames (None with scene sampling): what `events.text_events` needs."""
        return 1 / self.fps if self.fps else None


@dataclass
class Summary:
    """Totals over the inputs analysed without error; `realtime_factor` = media seconds / wall seconds."""

    files: int
    failed: int
    media_seconds: float
    frames: int
    decode_seconds: float
    model_seconds: dict[str, float]
    wall_seconds: float
    realtime_factor: float | None


@dataclass
class Analysis:
    """One `trident analyze` run. `created` is an ISO 8601 UTC time; `wall_seconds` the whole run's wall time."""

    server: Server
    options: Options
    created: str
    trident_version: str
    wall_seconds: float = 0.0
    inputs: list[FileAnalysis] = field(default_factory=list)

    @classmethod
    def begin(cls, server: Server, options: Options) -> "Analysis":
        """A new analysis without inputs, stamped with the current UTC time and this client's version."""
        try:
            version = importlib.metadata.version("trident")
        except importlib.metadata.PackageNotFoundError:  # run from a source tree that was not installed
            version = "unknown"
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
        return cls(server=server, options=options, created=created, trident_version=version)

    @property
    def summary(self) -> Summary:
        done = [f for f in self.inputs if f.error is None]
        model_seconds: dict[str, float] = {}
        for f in done:
            for model, seconds in f.timings.models.items():
                model_seconds[model] = model_seconds.get(model, 0.0) + seconds
        media = sum(f.media.duration or 0.0 for f in done if f.media)
        return Summary(files=len(self.inputs), failed=len(self.inputs) - len(done), media_seconds=media,
                       frames=sum(len(f.frames) for f in done),
                       decode_seconds=sum(f.timings.decode for f in done),
                       model_seconds=dict(sorted(model_seconds.items())), wall_seconds=self.wall_seconds,
                       realtime_factor=media / self.wall_seconds if media and self.wall_seconds > 0 else None)

    def to_dict(self) -> dict:
        """The analysis.json document (without thumbnails)."""
        return {"schema": SCHEMA, "created": self.created, "trident_version": self.trident_version,
                "server": asdict(self.server), "options": asdict(self.options),
                "summary": asdict(self.summary), "inputs": [_file_to_dict(f) for f in self.inputs]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=1)

    @classmethod
    def from_dict(cls, document: dict) -> "Analysis":
        """Read an analysis.json document; the summary is recomputed from the inputs."""
        if document.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} document (its schema is {document.get('schema')!r})")
        return cls(server=Server(**document["server"]), options=Options(**document["options"]),
                   created=document["created"], trident_version=document["trident_version"],
                   wall_seconds=document["summary"]["wall_seconds"],
                   inputs=[_file_from_dict(f) for f in document["inputs"]])

    @classmethod
    def from_json(cls, text: str) -> "Analysis":
        return cls.from_dict(json.loads(text))


def _file_to_dict(f: FileAnalysis) -> dict:
    return {"path": f.path, "kind": f.kind, "media": asdict(f.media) if f.media else None,
            "transcript": f.transcript.to_dict() if f.transcript else None,
            "frames": [{"index": fr.index, "time": fr.time, "detections": [asdict(d) for d in fr.detections],
                        "text": [line.to_dict() for line in fr.text]} for fr in f.frames],
            "text_events": [asdict(e) for e in f.text_events], "object_counts": asdict(f.object_counts),
            "notes": list(f.notes), "error": f.error, "timings": asdict(f.timings)}


def _file_from_dict(d: dict) -> FileAnalysis:
    transcript = d["transcript"]
    return FileAnalysis(
        path=d["path"], kind=d["kind"], media=MediaInfo(**d["media"]) if d["media"] else None,
        transcript=Transcription(text=transcript["text"], language=transcript["language"],
                                 segments=[Segment.from_dict(s) for s in transcript["segments"]])
        if transcript else None,
        frames=[Frame(index=fr["index"], time=fr["time"],
                      detections=[Detection(tuple(x["box"]), x["score"], x["class_id"], x["label"])
                                  for x in fr["detections"]],
                      text=[TextLine(_points(x["box"]), x["text"], x["score"]) for x in fr["text"]])
                for fr in d["frames"]],
        text_events=[TextEvent(**{**e, "box": _points(e["box"])}) for e in d["text_events"]],
        object_counts=ObjectCounts(times=d["object_counts"]["times"],
                                   classes=[ClassCounts(**c) for c in d["object_counts"]["classes"]]),
        notes=d["notes"], error=d["error"], timings=Timings(**d["timings"]))


def _points(box: list) -> list[tuple[float, float]]:
    return [(x, y) for x, y in box]
