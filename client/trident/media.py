"""Media files for the pipeline, without a server: what a file holds (`probe`), its audio track for `whisper`
(`extract_audio`), its frames sampled by time or by scene for `detect` and `easyocr` (`sample_frames`), and the
media files among paths and folders (`expand`). Needs PyAV: `pip install trident[media]`.

Times are seconds on the media's timeline, whose 0 is the container's start time (the earliest first timestamp
of its streams, as the ffmpeg program counts): frame times and the audio track's `start` are on the same clock.

Decoding does only what the request needs. Frames are decoded but not converted (no colour conversion, no
copy) unless they are returned or analysed; the decoder runs frame and slice threads. Where the container has a
seek index (MP4/MOV, MKV/WebM with cues), the sampler seeks to the keyframe before the next sample time
whenever that keyframe lies more than `SEEK_MIN_SKIP_S` beyond what it has decoded, skipping frames nobody
asked for; without an index (MPEG-TS) it decodes sequentially, and so it does AVI, whose frames it counts.
Bad files raise `MediaError` naming the file, never a PyAV traceback.
"""
from __future__ import annotations

import bisect
import contextlib
import io
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import av
import numpy as np

from .errors import TridentError

VIDEO_EXTENSIONS = frozenset(".mp4 .m4v .mov .mkv .webm .avi .ts .mts .m2ts .flv .wmv .mpg .mpeg .3gp .ogv".split())
AUDIO_EXTENSIONS = frozenset(".wav .flac .mp3 .m4a .aac .ogg .oga .opus .wma".split())
IMAGE_EXTENSIONS = frozenset(".jpg .jpeg .png .webp .bmp".split())
# The demuxers FFmpeg may pick for a file, by libavformat's names: without a list it probes ~350, among them
# playlists (HLS, ffconcat) that would open other files or URLs named inside a file that only looks like a video.
DEMUXERS = "mov,matroska,avi,mpegts,flv,asf,mpeg,ogg,wav,mp3,flac,aac"
# Compressed audio codec -> a container the server's `decode_audio` demuxes (WAV, FLAC, MP3, OGG, MP4) that
# holds it as it is. Any other codec would need a container the server refuses: it is decoded to PCM.
REMUX_FORMATS = {"aac": "mp4", "alac": "mp4", "mp2": "mp4", "ac3": "mp4", "eac3": "mp4", "mp3": "mp3",
                 "flac": "flac", "opus": "ogg", "vorbis": "ogg"}
# Uncompressed audio goes as WAV where that is smaller than the decoded alternative, 16 kHz mono float32
# (512 kbit/s): dictation and telephone recordings. 48 kHz stereo camera audio (1536 kbit/s) is sent decoded.
WAV_CODECS = frozenset("pcm_s16le pcm_s24le pcm_s32le pcm_f32le pcm_u8 pcm_mulaw pcm_alaw".split())
SAMPLE_RATE = 16000  # whisper's
PCM_BIT_RATE = SAMPLE_RATE * 32
# A stream whose decodable content falls short of its header's duration by more than this is truncated; the
# server's rule for audio (trident_serving.audio), applied here to the video and the audio the client reads.
TRUNCATION_SLACK_S, TRUNCATION_SLACK_FRACTION = 0.25, 0.02
# Scene detection (see `sample_frames`)
SCENE_ANALYSIS_FPS = 1.0
SCENE_THRESHOLD = 30.0
MIN_SCENE_S = 1.0
THUMBNAIL_SIZE = (64, 36)
EPSILON_S = 1e-6  # float noise in k / fps against a frame's exact rational time
SEEK_RETRIES = 3
# A seek restarts the decoder (its frame threads refill): skipping less than this much video does not pay
# (measured on the test video: at 5 samples a second, seeking to every keyframe ahead cost 10 % more CPU)
SEEK_MIN_SKIP_S = 0.5


class MediaError(TridentError, ValueError):
    """A media file is missing, unreadable, corrupt or truncated; the message names it."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)


@dataclass(frozen=True)
class MediaInfo:
    """What `probe` finds. `width`/`height` are as displayed (after `rotation`); video fields are None without a
    video track, audio fields None without an audio track; `duration` is None for an image or an unknown length.
    `rotation` is the counter-clockwise turn, in degrees, that a video's display matrix asks for; frames come out
    turned. `keyframe_interval`: the longest gap between keyframes in the index (None without one, and for AVI).
    """

    path: Path
    kind: str  # "video", "audio" or "image"
    format: str
    size_bytes: int
    duration: float | None
    has_video: bool
    has_audio: bool
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    frames: int | None = None
    video_codec: str | None = None
    rotation: int = 0
    keyframe_interval: float | None = None
    audio_codec: str | None = None
    sample_rate: int | None = None
    channels: int | None = None


@dataclass(frozen=True)
class AudioTrack:
    """The audio for `whisper`, as `Client.transcribe` takes it: `data` is either an encoded file (the original
    compressed packets in the container `format`) or, where `format` is "pcm", 16 kHz mono float32 samples.
    `start` is when its first sample plays on the media's timeline: add it to the transcript's times."""

    data: bytes | np.ndarray
    format: str
    codec: str
    start: float
    duration: float


@dataclass(frozen=True)
class SampledFrame:
    """One frame for the models. `image` is HxWx3 BGR uint8, upright. `index` is k for the k-th sample (the k-th
    scene with `scenes=True`); `time` is the sampled instant, `frame_time` the shown frame's own timestamp."""

    index: int
    time: float
    frame_time: float
    image: np.ndarray


def media_kind(path: str | os.PathLike) -> str | None:
    """The kind of media a file is by its extension ("video", "audio" or "image"), or None."""
    suffix = Path(path).suffix.lower()
    for kind, extensions in (("video", VIDEO_EXTENSIONS), ("audio", AUDIO_EXTENSIONS), ("image", IMAGE_EXTENSIONS)):
        if suffix in extensions:
            return kind
    return None


def expand(paths: Iterable[str | os.PathLike]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The media files among `paths`, folders expanded to the media files anywhere below them (sorted, hidden
    entries skipped), in the order given; and the paths skipped, each with why (not a media file by its
    extension, or missing). Nothing here is fatal: the caller reports the skipped ones."""
    found: dict[Path, None] = {}  # ordered, and found once however often named
    skipped: list[tuple[Path, str]] = []
    for given in map(Path, paths):
        if given.is_dir():
            below = sorted(p for p in given.rglob("*")
                           if p.is_file() and not any(part.startswith(".") for part in p.relative_to(given).parts))
            candidates = below
        elif given.exists():
            candidates = [given]
        else:
            skipped.append((given, "does not exist"))
            continue
        for path in candidates:
            if media_kind(path) is None:
                skipped.append((path, f"not a media file (known: {_known_extensions()})"))
            else:
                found.setdefault(path)
    return list(found), skipped


def probe(path: str | os.PathLike) -> MediaInfo:
    """Streams, codecs, duration, size, frame rate and rotation of a media file (one frame is decoded to learn
    the rotation and to prove the video decodes)."""
    path = Path(path)
    kind = _require_media(path)
    if kind == "image":
        with _open_image(path) as image:
            width, height = image.size
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientations that turn it by 90 degrees
                width, height = height, width
            return MediaInfo(path, "image", image.format.lower(), path.stat().st_size, None, True, False,
                             width=width, height=height)
    with _open(path) as container, _reading(path):
        video, audio = _video_stream(container), _audio_stream(container)
        if video is None and audio is None:
            raise MediaError(path, "holds neither an audio nor a video track")
        info = dict(path=path, format=container.format.name, size_bytes=path.stat().st_size,
                    duration=_container_duration(container), has_video=video is not None,
                    has_audio=audio is not None, kind="video" if video is not None else "audio")
        if audio is not None:
            info.update(audio_codec=audio.codec.canonical_name, sample_rate=audio.codec_context.sample_rate,
                        channels=audio.codec_context.channels)
        if video is not None:
            reader = _VideoReader(path, container, video, seek=True)
            reader.first_frame()  # sets the rotation
            width, height = (video.height, video.width) if reader.rotation in (90, 270) else (video.width,
                                                                                               video.height)
            gaps = np.diff(reader.keyframe_times)
            rate = video.guessed_rate or video.average_rate
            info.update(width=width, height=height, fps=float(rate) if rate else None, frames=video.frames or None,
                        video_codec=video.codec.canonical_name, rotation=reader.rotation,
                        keyframe_interval=round(float(gaps.max()), 6) if gaps.size else None)
        return MediaInfo(**info)


def extract_audio(path: str | os.PathLike) -> AudioTrack | None:
    """The audio track for `whisper`, or None where there is none (an image, a silent video).

    A compressed track is remuxed in memory, packets untouched, into a container the server decodes
    (`REMUX_FORMATS`; PCM into WAV where that is smaller): the server's `decode_audio` then yields exactly the
    samples it would from the original file. Otherwise (a codec no such container holds, PCM at rates above
    16 kHz mono float32's) the track is decoded here to 16 kHz mono float32 as the server decodes (s16 samples
    from libswresample's defaults, divided by 32768), so again the same.
    Of several tracks, FFmpeg's "best" one is taken, as the ffmpeg program would.
    """
    path = Path(path)
    if _require_media(path) == "image":
        return None
    with _open(path) as container, _reading(path):
        stream = _audio_stream(container)
        if stream is None:
            return None
        codec, declared = stream.codec.canonical_name, _declared_duration(stream)
        start = 0.0
        if stream.start_time is not None:
            start = round(float(stream.start_time * stream.time_base) - _origin(container), 6) + 0.0  # not -0.0
        target = REMUX_FORMATS.get(codec)
        if codec in WAV_CODECS and 0 < (stream.codec_context.bit_rate or PCM_BIT_RATE) < PCM_BIT_RATE:
            target = "wav"
        if target is not None:
            try:
                data, duration = _remux(container, stream, target)
            except (av.error.FFmpegError, ValueError):
                # the muxer refused this stream's parameters, or the input is damaged: decode instead (from the
                # start, in a fresh container), where damage is reported
                target = None
    if target is None:
        with _open(path) as container, _reading(path):
            data = _decode_pcm(container, _audio_stream(container))
            duration = data.size / SAMPLE_RATE
    _check_length(path, "audio", duration, declared)
    return AudioTrack(data, target or "pcm", codec, start, duration)


def sample_frames(path: str | os.PathLike, fps: float | None = None, *, scenes: bool = False, seek: bool = True,
                  analysis_fps: float = SCENE_ANALYSIS_FPS, threshold: float = SCENE_THRESHOLD,
                  min_scene: float = MIN_SCENE_S) -> Iterator[SampledFrame]:
    """Frames of a video, an image's one frame (time 0), or nothing for audio.

    With `fps=F`, sample k is the frame shown at t = k/F, for every t before the video's end: the last frame
    whose timestamp is <= t (the first frame where none is that early). A frame may be yielded for several t
    when F is above the video's rate.

    With `scenes=True`, one frame per scene. The video is analysed at `analysis_fps` (frames sampled as above,
    1 a second by default): each analysed frame is shrunk to a 64x36 grey thumbnail, and a scene starts at the
    first analysed frame whose thumbnail differs from the previous one's by a mean absolute difference of at
    least `threshold` (grey levels, 0-255), provided the scene so far has lasted `min_scene` seconds. The first
    analysed frame of each scene is yielded (the first at t=0), so a cut is found at most one analysis
    interval after it. Why: the thumbnail averages away compression noise and small motion; a hard cut changes
    most of the picture (by 53 levels at the test video's cut) where motion within a scene changes less (19 at
    most over a second of its 20 pixel/s pan; 13 over half a second); a reduced rate costs less decoding, and
    unlike frame-to-frame differences it still sees a dissolve spread over many frames; the minimum length
    stops a flash or a burst of fast motion from making a scene of every frame. Where the index shows a
    keyframe at least every 1/`analysis_fps` seconds but not at every frame (phone video: one a second), only
    keyframes are decoded (`skip_frame="NONKEY"`) and analysed: the cheapest frames that are frequent enough.

    `seek=False` decodes sequentially even where seeking would skip work (the frames are the same).
    """
    if scenes == (fps is not None):
        raise ValueError("give either fps=F (frames per second to sample) or scenes=True")
    rate = analysis_fps if scenes else fps
    if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
        raise ValueError(f"{'analysis_fps' if scenes else 'fps'} must be a positive number, got {rate!r}")
    path = Path(path)
    if _require_media(path) == "image":
        yield SampledFrame(0, 0.0, 0.0, _read_image(path))
        return
    with _open(path) as container, _reading(path):
        stream = _video_stream(container)
        if stream is None:
            return
        reader = _VideoReader(path, container, stream, seek=seek)
        if not scenes:
            for k, (t, frame) in enumerate(reader.frames_at(reader.sample_times(fps))):
                yield SampledFrame(k, t, reader.time(frame), reader.bgr(frame))
            return
        analysed = (reader.keyframes() if reader.keyframes_suffice(analysis_fps)
                    else reader.frames_at(reader.sample_times(analysis_fps)))
        previous, scene_start, index = None, -math.inf, 0
        for t, frame in analysed:
            thumbnail = frame.reformat(*THUMBNAIL_SIZE, format="gray").to_ndarray().astype(np.int16)
            if previous is None or (np.abs(thumbnail - previous).mean() >= threshold
                                    and t - scene_start >= min_scene - EPSILON_S):
                yield SampledFrame(index, t, reader.time(frame), reader.bgr(frame))
                index, scene_start = index + 1, t
            previous = thumbnail


class _VideoReader:
    """Decodes one video stream of an open container: frames at given times, keyframes only, BGR pictures."""

    def __init__(self, path: Path, container: av.container.InputContainer, stream: av.video.VideoStream,
                 seek: bool):
        self.path, self.container, self.stream = path, container, stream
        for other in container.streams:  # the demuxer skips their packets instead of reading them
            if other is not stream:
                other.discard = av.stream.Discard.all
        stream.thread_type = "AUTO"  # frame and slice threads
        self.time_base: Fraction = stream.time_base
        self.origin = _origin(container)
        rate = stream.guessed_rate or stream.average_rate  # the base rate: AVI's average can be twice it
        self.frame_duration = float(1 / rate) if rate else 0.0
        # what the stream's header says it lasts (for the truncation check; MKV says it of the whole file only,
        # where a longer audio track must not make the video look truncated), and when the video ends
        self.declared = _declared_duration(stream)
        self.end = self._first_time() + self.declared if self.declared else _container_duration(container)
        self.rotation = 0
        self._latest_end = -math.inf  # the end of the latest frame decoded, for the truncation check
        # AVI stores no presentation times (frame n is shown n frame durations in) and FFmpeg's guesses come out
        # of order with B-frames: its frames are counted instead, decoding sequentially.
        self._ticks_per_frame = round(1 / (rate * self.time_base)) if container.format.name == "avi" and rate else 0
        # an empty index (MPEG-TS), a counted stream or seek=False: sequential decoding
        self.keyframe_times = self._indexed_keyframe_times() if seek and not self._ticks_per_frame else []

    def time(self, frame: av.VideoFrame) -> float:
        if frame.pts is None:
            raise MediaError(self.path, "its video frames carry no timestamps")
        return self._seconds(frame.pts)

    def bgr(self, frame: av.VideoFrame) -> np.ndarray:
        image = frame.to_ndarray(format="bgr24")
        return np.ascontiguousarray(np.rot90(image, self.rotation // 90)) if self.rotation else image

    def first_frame(self) -> av.VideoFrame:
        frame = next(self._frames(), None)
        if frame is None:
            raise MediaError(self.path, "its video track holds no decodable frame")
        return frame

    def sample_times(self, fps: float) -> Iterator[float]:
        """k / fps for k = 0, 1, ... before the video's end (until the last frame where the end is unknown)."""
        end = self.end if self.end is not None else math.inf
        k = 0
        while k / fps < end - EPSILON_S:
            yield k / fps
            k += 1

    def frames_at(self, times: Iterable[float]) -> Iterator[tuple[float, av.VideoFrame]]:
        """(t, the last frame whose time is <= t) for ascending t."""
        decoded = self._frames()
        shown = ahead = None  # the frame shown at the previous t; the first decoded frame after it
        for t in times:
            position = ahead if ahead is not None else shown
            reached = self.time(position) if position is not None else self._first_time()
            if self._keyframe_before(t) > reached + SEEK_MIN_SKIP_S:  # frames up to that keyframe are not needed
                decoded, shown, ahead = self._seek(t), None, None
            while True:
                if ahead is None:
                    ahead = next(decoded, None)
                    if ahead is None:  # the end of the stream
                        break
                if self.time(ahead) > t + EPSILON_S:
                    break
                shown, ahead = ahead, None
            if ahead is None:
                self._check_complete()
                if shown is None:
                    raise MediaError(self.path, f"no video frame decodes at {t:.3f} s")
                if self.end is None and t > self.time(shown) + self.frame_duration:
                    return  # the end of a stream of unknown length
            yield t, shown if shown is not None else ahead

    def keyframes(self) -> Iterator[tuple[float, av.VideoFrame]]:
        """(time, frame) of every keyframe, the other frames skipped by the decoder."""
        self.stream.codec_context.skip_frame = "NONKEY"
        last = -math.inf
        for frame in self._frames():
            last = self.time(frame)
            yield last, frame
        if last < self.keyframe_times[-1] - EPSILON_S:
            raise MediaError(self.path, f"is truncated or corrupt: its index lists a keyframe at "
                                        f"{self.keyframe_times[-1]:.2f} s, but decoding ends at {max(last, 0):.2f} s")

    def keyframes_suffice(self, analysis_fps: float) -> bool:
        """Whether keyframes alone come at least `analysis_fps` times a second, without being every frame
        (then decoding them is no saving, and seeking to sampled keyframes decodes fewer)."""
        if len(self.keyframe_times) < 2 or self.end is None:
            return False
        gaps = np.diff([*self.keyframe_times, self.end])
        return gaps.max() <= 1 / analysis_fps + EPSILON_S and gaps.mean() > 1.5 * self.frame_duration

    def _indexed_keyframe_times(self) -> list[float]:
        """When each keyframe the container's index lists is shown. MKV reads its index (cues, at the end of the
        file) at the first seek: one is made first. MP4's index holds decode timestamps, which run ahead of the
        shown ones by the B-frame delay: the first packet's pts - dts is added to them (in MKV, whose index holds
        shown times, a packet's dts is unset or its pts: nothing is added)."""
        if not len(self.stream.index_entries):  # MPEG-TS: no index
            return []
        self._rewind()
        keys = [entry.timestamp for entry in self.stream.index_entries if entry.is_keyframe]
        first = next(self.container.demux(self.stream), None)
        delay = first.pts - first.dts if first is not None and None not in (first.pts, first.dts) else 0
        self._rewind()
        return [self._seconds(key + delay) for key in keys]

    def _rewind(self) -> None:
        self.container.seek(self.stream.start_time or 0, stream=self.stream, backward=True)

    def _frames(self) -> Iterator[av.VideoFrame]:
        for count, frame in enumerate(self.container.decode(self.stream)):
            if self._ticks_per_frame:
                frame.pts = (self.stream.start_time or 0) + count * self._ticks_per_frame
            if not self.rotation and frame.rotation:
                self.rotation = round(frame.rotation / 90) % 4 * 90
            self._latest_end = max(self._latest_end, self.time(frame) + self.frame_duration)
            yield frame

    def _seek(self, t: float) -> Iterator[av.VideoFrame]:
        """Frames from the keyframe at or before t. Demuxers that seek by decode time may land on a keyframe
        shown after t; then step back before it, or at last decode from the start."""
        target = self._pts(t)
        for _ in range(SEEK_RETRIES):
            self.container.seek(target, stream=self.stream, backward=True)
            decoded = self._frames()
            first = next(decoded, None)
            if first is None or self.time(first) <= t + EPSILON_S:
                return _chain(first, decoded)
            target = min(target, first.pts) - 1
        self._rewind()
        return self._frames()

    def _keyframe_before(self, t: float) -> float:
        i = bisect.bisect_right(self.keyframe_times, t + EPSILON_S)
        return self.keyframe_times[i - 1] if i else -math.inf

    def _first_time(self) -> float:
        start = self.stream.start_time
        return self._seconds(start) if start is not None else 0.0

    def _check_complete(self) -> None:
        _check_length(self.path, "video", self._latest_end - self._first_time(), self.declared)

    def _seconds(self, pts: int) -> float:
        return float(pts * self.time_base) - self.origin

    def _pts(self, seconds: float) -> int:
        return math.floor(Fraction(seconds + self.origin) / self.time_base)


def _chain(first, rest: Iterator) -> Iterator:
    if first is not None:
        yield first
    yield from rest


def _remux(container: av.container.InputContainer, stream: av.audio.AudioStream, fmt: str) -> tuple[bytes, float]:
    """The stream's packets in a new `fmt` container in memory, and the seconds they span."""
    buffer = io.BytesIO()
    first, end = math.inf, -math.inf
    with av.open(buffer, "w", format=fmt) as output:
        copy = output.add_stream_from_template(stream)
        for packet in container.demux(stream):
            if packet.dts is None:  # the demuxer's final, empty packet
                continue
            # Matroska's DiscardPadding (Opus) drops samples at the end yet leaves the last block's duration
            # whole; Ogg and MP4 say it with a shorter last packet (as Ogg's demuxer already gives it)
            trim = _padding_at_end(packet) if container.format.name.startswith("matroska") else 0
            if trim:
                _in_samples(packet, stream.codec_context.sample_rate)
                packet.duration -= trim
            start = float((packet.pts if packet.pts is not None else packet.dts) * packet.time_base)
            first, end = min(first, start), max(end, start + float(packet.duration * packet.time_base))
            packet.stream = copy
            output.mux(packet)
    return buffer.getvalue(), max(end - first, 0.0)


def _in_samples(packet: av.Packet, sample_rate: int) -> None:
    """Restate the packet's timestamps in 1/sample_rate units (exactly, for whole-sample times)."""
    scale, samples = packet.time_base * sample_rate, Fraction(1, sample_rate)
    packet.pts = round(packet.pts * scale) if packet.pts is not None else None
    packet.dts = round(packet.dts * scale)
    packet.duration = round(packet.duration * scale)
    packet.time_base = samples


def _padding_at_end(packet: av.Packet) -> int:
    """How many samples the decoder is told to drop from the end of this packet (its "skip samples" side data:
    32-bit little-endian samples to skip at the start, then at the end)."""
    if not packet.has_sidedata("skip_samples"):
        return 0
    return int.from_bytes(bytes(packet.get_sidedata("skip_samples"))[4:8], "little")


def _decode_pcm(container: av.container.InputContainer, stream: av.audio.AudioStream) -> np.ndarray:
    """16 kHz mono float32, as the server's `decode_audio` makes it, the same way: whisper's ffmpeg command
    resamples to s16, so do we; a new resampler wherever the source's format changes; a packet that fails to
    decode is skipped, as the ffmpeg program skips it."""
    chunks, resampler, source = [], None, None

    def resample(frame: av.AudioFrame | None) -> None:  # None flushes the resampler's filter delay
        chunks.extend(resampled.to_ndarray().reshape(-1) for resampled in resampler.resample(frame))

    for packet in container.demux(stream):  # the last, empty packet flushes the decoder
        try:
            frames = packet.decode()
        except av.error.InvalidDataError:
            continue
        for frame in frames:
            if (frame.format.name, frame.layout.name, frame.sample_rate) != source:
                if resampler is not None:
                    resample(None)
                resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
                source = (frame.format.name, frame.layout.name, frame.sample_rate)
            resample(frame)
    if resampler is not None:
        resample(None)
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32) / 32768.0


def _check_length(path: Path, what: str, decoded: float, declared: float | None) -> None:
    if declared and decoded < declared - max(TRUNCATION_SLACK_S, TRUNCATION_SLACK_FRACTION * declared):
        raise MediaError(path, f"is truncated or corrupt: its header says the {what} lasts {declared:.2f} s, "
                               f"but only {max(decoded, 0.0):.2f} s of it can be read")


def _require_media(path: Path) -> str:
    if not path.is_file():
        raise MediaError(path, "does not exist" if not path.exists() else "is not a file")
    if path.stat().st_size == 0:
        raise MediaError(path, "is empty")
    kind = media_kind(path)
    if kind is None:
        raise MediaError(path, f"is not a media file (known: {_known_extensions()})")
    return kind


def _known_extensions() -> str:
    return " ".join(sorted(e[1:] for e in VIDEO_EXTENSIONS | AUDIO_EXTENSIONS | IMAGE_EXTENSIONS))


def _open(path: Path) -> av.container.InputContainer:
    try:
        return av.open(str(path), metadata_errors="ignore", options={"format_whitelist": DEMUXERS})
    except (av.error.FFmpegError, OSError) as exc:
        raise MediaError(path, f"cannot be read as audio or video: it is not one of the formats "
                               f"{DEMUXERS.replace(',', ', ')}, or it is damaged ({_reason(exc)})") from None


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turns FFmpeg's errors while reading `path` into a MediaError naming it."""
    try:
        yield
    except av.error.FFmpegError as exc:
        raise MediaError(path, f"is corrupt or truncated: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc)


def _open_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError) as exc:
        raise MediaError(path, f"is not a readable image: {exc}") from None


def _read_image(path: Path) -> np.ndarray:
    """BGR pixels, EXIF orientation applied (as `cv2.imread` and the server do)."""
    from PIL import ImageOps

    with _open_image(path) as image:
        try:
            rgb = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
        except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt pixel data
            raise MediaError(path, f"is a corrupt or truncated image: {exc}") from None
    return np.ascontiguousarray(rgb[..., ::-1])


def _video_stream(container: av.container.InputContainer) -> av.video.VideoStream | None:
    """The first real video track: cover art in a music file is a one-picture "video" stream, not a video."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    return None


def _audio_stream(container: av.container.InputContainer) -> av.audio.AudioStream | None:
    return container.streams.best("audio") if container.streams.audio else None


def _origin(container: av.container.InputContainer) -> float:
    return container.start_time / av.time_base if container.start_time is not None else 0.0


def _container_duration(container: av.container.InputContainer) -> float | None:
    return container.duration / av.time_base if container.duration else None


def _declared_duration(stream: av.stream.Stream) -> float | None:
    """What the header says the stream lasts, where it says it."""
    return float(stream.duration * stream.time_base) if stream.duration else None
