"""The pipeline of `trident analyze`: media files in; transcript, objects and on-screen text out.

    analysis = analyze(["talk.mp4"], url="localhost:8001", options=Options(fps=1), out="talk-analysis")

Each input is analysed in turn. Its audio track (`media.extract_audio`: compressed packets remuxed, not decoded)
goes to `whisper` with word timestamps on, while its frames (`media.sample_frames`: a fixed rate, or one per
scene) go each to `detect` and to `easyocr`: all three models work at once, over one `trident.aio.Client`
(one gRPC channel). At most `in_flight` frames are out at a time (default 16: enough queued requests for the
server's dynamic batcher to fill batches, few enough that memory stays flat), and the decoder runs in a thread
of its own only as far ahead as that bound lets it, so decoding overlaps the requests without racing ahead of
them. Each frame is encoded once (lossless PNG) and the same bytes go to both frame models.

What can go wrong is kept per input: a file that cannot be decoded (`MediaError`, naming it) or that a model
refuses gets its `error` and keeps what was done; the other inputs are still analysed. A file without an audio
track gets no transcript and a note; one without a video track is transcribed only. A server that goes away
(`ServerUnavailableError`) or Ctrl-C ends the run: the input under way keeps its error ("interrupted"), the
inputs not reached are listed as not analysed, and `analyze` writes what was done before it re-raises.

`analyze_async` is the same run for a caller with an event loop of its own (the REST gateway): it reports its
`Progress` to a callback, and cancelling the task running it stops the run at once.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import math
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, Sequence, TypeVar

from .. import media
from ..aio import Client
from ..errors import ServerUnavailableError, TridentError
from ..inputs import encode_image
from ..results import Transcription
from . import events, output
from .report import thumbnail
from .results import Analysis, FileAnalysis, Frame, MediaInfo, Options, Server

MODELS = ("whisper", "detect", "easyocr")
IN_FLIGHT = 16
NOT_REACHED = "not analysed: the run ended before this input"
STAGES = ("decode", "detect", "easyocr", "whisper")
Result = TypeVar("Result")


@dataclass
class Progress:
    """Where a run stands on the input under way: per stage (decode, detect, easyocr: frames; whisper: seconds of
    audio) what is done and its total, None where not known ahead (frames sampled per scene) or not to be done."""

    path: str
    done: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    totals: dict[str, float | None] = field(default_factory=lambda: dict.fromkeys(STAGES))

    @property
    def frames_done(self) -> int:
        """Frames answered by both frame models."""
        return int(min(self.done["detect"], self.done["easyocr"]))

    @property
    def fraction(self) -> float | None:
        """The share of the model work done, 0 to 1: the mean of done/total over the models with a known total;
        None when none is known."""
        shares = [min(self.done[s] / total, 1.0) for s in ("detect", "easyocr", "whisper")
                  if (total := self.totals[s])]
        return sum(shares) / len(shares) if shares else None


class ServerGone(ServerUnavailableError):
    """The server went away during a run; `analysis` holds what was done (written to the output folder)."""

    def __init__(self, message: str, analysis: Analysis):
        super().__init__(message)
        self.analysis = analysis


def analyze(paths: Sequence[str | Path], url: str = "localhost", protocol: str | None = None,
            options: Options | None = None, out: str | Path | None = None, in_flight: int = IN_FLIGHT,
            timeout: float = 600.0, progress: bool = False, client_options: dict | None = None) -> Analysis:
    """Analyse media files (or folders of them) on the server at `url`, write the results into `out` (if
    given: `output.write`) and return them. `options` default to one frame a second. Paths that are missing or
    not media files are listed in the results as failed inputs, with why. `client_options` go to the
    `trident.aio.Client` (TLS: `ssl`, `root_certificates`, `private_key`, `certificate_chain`).

    Raises `ServerUnavailableError` when the server cannot be reached or is not ready before anything is
    decoded; `ServerGone` (after writing the partial results) when it goes away mid-run; KeyboardInterrupt
    (after writing) on Ctrl-C."""
    analysis, files = _begin(paths, url, protocol, options, in_flight)
    client = Client(url, protocol=protocol, timeout=timeout, **(client_options or {}))
    try:
        asyncio.run(_run(analysis, files, client, in_flight, progress))
    except (ServerUnavailableError, KeyboardInterrupt) as exc:
        if analysis.server.models:  # it answered once: what was done is worth writing
            if out is not None:
                output.write(analysis, out)
            if isinstance(exc, ServerUnavailableError):
                raise ServerGone(str(exc), analysis) from exc
        raise
    if out is not None:
        output.write(analysis, out)
    return analysis


async def analyze_async(paths: Sequence[str | Path], client: Client, options: Options | None = None,
                        in_flight: int = IN_FLIGHT, on_progress: Callable[[Progress], None] | None = None) -> Analysis:
    """`analyze` inside a running event loop, through `client` (left open), writing nothing: `on_progress` (if
    given) gets the `Progress` of the input under way after each frame and transcript. Cancelling the task that
    awaits it cancels the requests out and closes the decoder, then raises CancelledError; the other errors are
    those of `analyze`, raised without the partial results."""
    analysis, files = _begin(paths, client.url, client.protocol, options, in_flight)
    await _run_with(client, analysis, files, in_flight, False, on_progress)
    return analysis


def _begin(paths: Sequence[str | Path], url: str, protocol: str | None, options: Options | None,
           in_flight: int) -> tuple[Analysis, list[Path]]:
    """A new analysis listing the paths that are no media files, and the media files to analyse."""
    if in_flight < 1:
        raise ValueError(f"in_flight must be at least 1, got {in_flight}")
    files, not_media = media.expand(paths)
    analysis = Analysis.begin(Server(url=url, protocol=protocol or ""), options or Options(fps=1.0))
    analysis.inputs = [FileAnalysis(path=str(p), error=why) for p, why in not_media]
    return analysis, files


async def _run(analysis: Analysis, files: list[Path], client: Client, in_flight: int, progress: bool) -> None:
    async with client:
        await _run_with(client, analysis, files, in_flight, progress)


async def _run_with(client: Client, analysis: Analysis, files: list[Path], in_flight: int, progress: bool,
                    listener: Callable[[Progress], None] | None = None) -> None:
    start = time.perf_counter()
    analysis.server = await _server(client)
    bars = _Bars(progress, listener)
    try:
        for n, path in enumerate(files):
            result = FileAnalysis(path=str(path))
            analysis.inputs.append(result)
            try:
                await _analyze_file(client, path, analysis.options, result, in_flight, bars)
            except (ServerUnavailableError, asyncio.CancelledError) as exc:
                result.error = f"interrupted: {exc}" if isinstance(exc, TridentError) else "interrupted"
                analysis.inputs += [FileAnalysis(path=str(p), error=NOT_REACHED) for p in files[n + 1:]]
                raise
    finally:
        bars.close()
        analysis.wall_seconds = time.perf_counter() - start


async def _server(client: Client) -> Server:
    """Who answers, and which version of each model; refuses a server where a model the pipeline needs is not
    ready (before anything is decoded)."""
    health = await client.health()
    down = [f"{model} ({health['models'].get(model) or 'not in the repository'})" for model in MODELS
            if health["models"].get(model) != "READY"]
    if down or not health["ready"]:
        raise ServerUnavailableError(f"{health['url']}: not ready for analysis: {', '.join(down) or 'server'}")
    return Server(url=health["url"], protocol=health["protocol"],
                  models={model: health["versions"][model] for model in MODELS})


async def _analyze_file(client: Client, path: Path, options: Options, result: FileAnalysis, in_flight: int,
                        bars: "_Bars") -> None:
    """Fill `result` with what `path` holds; a `MediaError` or a refused request becomes its `error`."""
    started = time.perf_counter()
    timings = result.timings
    timings.models = {model: 0.0 for model in MODELS}
    speech: asyncio.Future | None = None
    try:
        info = await _timed(asyncio.to_thread(media.probe, path), timings, "decode")
        result.kind, result.media = info.kind, _media_info(info)
        bars.start(path, info, options)
        if info.has_audio:
            speech = asyncio.ensure_future(_transcribe(client, path, options, result, bars))
        elif info.kind == "video":
            result.notes.append("no audio track: no transcript")
        if info.kind == "video" and not info.has_video:
            result.notes.append("no video track: audio only")
        if info.has_video:
            await _frames(client, path, info, options, result, in_flight, bars)
        if speech is not None:
            await speech
    except ServerUnavailableError:
        raise
    except TridentError as exc:  # a MediaError naming the file, or a request the server refused
        result.error = str(exc)
    finally:
        if speech is not None:  # after a failure of the frames: stop it (or collect its own failure)
            speech.cancel()
            await asyncio.gather(speech, return_exceptions=True)
        result.frames.sort(key=lambda frame: frame.time)
        result.text_events = events.text_events(result.frames, options.interval)
        result.object_counts = events.object_counts(result.frames)
        timings.wall = time.perf_counter() - started


async def _transcribe(client: Client, path: Path, options: Options, result: FileAnalysis, bars: "_Bars") -> None:
    track = await _timed(asyncio.to_thread(media.extract_audio, path), result.timings, "decode")
    transcript = await _timed(client.transcribe(track.data, language=options.language, word_timestamps=True,
                                                temperature=options.temperature), result.timings, "whisper")
    result.transcript = shifted(transcript, track.start)
    bars.done("whisper", track.duration)


async def _frames(client: Client, path: Path, info: media.MediaInfo, options: Options, result: FileAnalysis,
                  in_flight: int, bars: "_Bars") -> None:
    """Sample frames in a decoder thread and send each to `detect` and `easyocr`, at most `in_flight` frames
    out at once. The first failed request cancels the frames still out and is raised; damage found by the
    decoder is raised once the frames decoded before it are answered (they are kept)."""
    decoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="trident-decode")
    samples = media.sample_frames(path, options.fps, scenes=options.scenes)
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(in_flight)
    out: set[asyncio.Task] = set()
    failure: list[BaseException] = []
    damage: media.MediaError | None = None

    def finished(task: asyncio.Task) -> None:
        out.discard(task)
        slots.release()
        if not task.cancelled() and task.exception() is not None and not failure:
            failure.append(task.exception())

    try:
        while not failure:
            await slots.acquire()
            if failure:
                break
            try:
                sample = await _timed(loop.run_in_executor(decoder, next, samples, None), result.timings, "decode")
            except media.MediaError as exc:
                damage, sample = exc, None
            if sample is None:
                slots.release()
                break
            bars.done("decode")
            task = asyncio.ensure_future(_frame(client, sample, info, result, bars))
            out.add(task)
            task.add_done_callback(finished)
        while out and not failure:
            await asyncio.wait(set(out), return_when=asyncio.FIRST_EXCEPTION)
        if failure:
            raise failure[0]
        if damage is not None:
            raise damage
    finally:
        for task in out:
            task.cancel()
        await asyncio.gather(*out, return_exceptions=True)
        decoder.submit(samples.close)  # after a `next` still running there: closes the container
        decoder.shutdown(wait=False)


async def _frame(client: Client, sample: media.SampledFrame, info: media.MediaInfo, result: FileAnalysis,
                 bars: "_Bars") -> None:
    encoded, small = await asyncio.to_thread(lambda: (encode_image(sample.image), thumbnail(sample.image)))
    detections, lines = await asyncio.gather(_timed(client.detect(encoded), result.timings, "detect"),
                                             _timed(client.read_text(encoded), result.timings, "easyocr"))
    bars.done("detect")
    bars.done("easyocr")
    index = round(sample.frame_time * info.fps) if info.fps else sample.index
    result.frames.append(Frame(index=index, time=sample.frame_time, detections=detections.detections,
                               text=lines, thumbnail=small))


async def _timed(work: Awaitable[Result], timings: Any, what: str) -> Result:
    """`await work`, adding its seconds to `timings.decode` (what="decode") or to `timings.models[what]`."""
    start = time.perf_counter()
    try:
        return await work
    finally:
        seconds = time.perf_counter() - start
        if what == "decode":
            timings.decode += seconds
        else:
            timings.models[what] += seconds


def shifted(transcript: Transcription, offset: float) -> Transcription:
    """`transcript` with every time moved by `offset` seconds (the audio track's start on the media's clock)."""
    if offset == 0:
        return transcript
    return replace(transcript, segments=[
        replace(s, start=s.start + offset, end=s.end + offset,
                words=[replace(w, start=w.start + offset, end=w.end + offset) for w in s.words])
        for s in transcript.segments])


def _media_info(info: media.MediaInfo) -> MediaInfo:
    """The part of what `media.probe` found that an analysis records (its schema's `media`)."""
    return MediaInfo(**{f.name: getattr(info, f.name) for f in fields(MediaInfo)})


class _Bars:
    """One progress bar per stage on stderr (tqdm; none when `shown` is false or stderr is not a terminal):
    frames decoded, frames answered by detect and by easyocr, seconds of audio transcribed; and the same as a
    `Progress` to `listener`, if given."""

    def __init__(self, shown: bool, listener: Callable[[Progress], None] | None = None):
        self.listener = listener
        self.progress = Progress(path="")
        self.bars: dict[str, Any] = {}
        if shown:
            from tqdm import tqdm

            units = {"decode": "frame", "detect": "frame", "easyocr": "frame", "whisper": "s"}
            self.bars = {stage: tqdm(desc=f"{stage:>8}", unit=unit, position=i, disable=None, dynamic_ncols=True)
                         for i, (stage, unit) in enumerate(units.items())}

    def start(self, path: Path, info: media.MediaInfo, options: Options) -> None:
        """Reset the bars for a new input; the frame total is known for fixed-rate sampling of a video."""
        frames = 1 if info.kind == "image" else None
        if info.kind == "video" and info.has_video and options.fps and info.duration:
            frames = math.ceil(info.duration * options.fps - 1e-6)
        for stage, bar in self.bars.items():
            bar.reset(total=round(info.duration or 0, 1) if stage == "whisper" else frames)
            bar.set_postfix_str(path.name, refresh=False)
        self.progress = Progress(path=str(path), totals={**dict.fromkeys(STAGES, frames if info.has_video else None),
                                                         "whisper": info.duration if info.has_audio else None})
        self._tell()

    def done(self, stage: str, amount: float = 1) -> None:
        if stage in self.bars:
            self.bars[stage].update(amount)
        self.progress.done[stage] += amount
        self._tell()

    def _tell(self) -> None:
        if self.listener is not None:
            self.listener(self.progress)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def summary_lines(analysis: Analysis) -> Iterator[str]:
    """The end-of-run summary the CLI prints: media length, frames, time per model, wall time, realtime factor."""
    s = analysis.summary
    failed = f", {s.failed} failed" if s.failed else ""
    speed = f" ({s.realtime_factor:.1f}x realtime)" if s.realtime_factor else ""
    yield (f"{s.files} input{'s' if s.files != 1 else ''}{failed}: {s.media_seconds:.1f} s of media, "
           f"{s.frames} frames analysed in {s.wall_seconds:.1f} s{speed}")
    spent = ", ".join(f"{model} {seconds:.1f} s" for model, seconds in s.model_seconds.items())
    yield f"time: decode {s.decode_seconds:.1f} s; requests (summed latencies, they overlap): {spent or 'none'}"
    for f in analysis.inputs:
        if f.error:
            yield f"{f.path}: {f.error}"
        for note in f.notes:
            yield f"{f.path}: {note}"
