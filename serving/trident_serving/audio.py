"""Decoding of encoded audio (WAV/FLAC/MP3/OGG/M4A...) sent as bytes, and checks of raw PCM input."""
from __future__ import annotations

import io

import av
import numpy as np

from .errors import InvalidInput

SAMPLE_RATE = 16000  # whisper.audio.SAMPLE_RATE
MAX_SECONDS = 2 * 60 * 60  # two hours; longer uploads are a mistake or an attack, not a request
FORMATS = "WAV, FLAC, MP3, OGG/Opus or M4A/AAC"
# The only demuxers FFmpeg may use on a request's bytes (names as libavformat spells them). Without this list,
# probing picks any of FFmpeg's ~350 demuxers: `ffconcat` or `hls` text would make the server open and
# transcribe files of its own, and image or video demuxers would run on audio requests.
DEMUXERS = "wav,flac,mp3,ogg,mov,mp4,m4a"
TRUNCATION_SLACK = 0.25  # seconds a decode may fall short of the stated length (encoder delay, rounding)


def decode_audio(data: bytes, name: str = "AUDIO", max_seconds: float = MAX_SECONDS) -> np.ndarray:
    """Decode an audio file's bytes to float32 16 kHz mono, as `whisper.load_audio(path)` does.

    whisper runs `ffmpeg -ac 1 -ar 16000 -f s16le`; PyAV carries the same libavcodec and libswresample, so
    downmixing and resampling go through the same `aresample` defaults and the same s16 rounding: the samples
    equal the CLI's of the same FFmpeg version. (Older libswresample, e.g. Debian 12's ffmpeg 5.1, resamples
    16-bit sources in 16-bit arithmetic and lands up to 3/32768 away; float sources such as MP3 match.)
    Like the CLI, packets that fail to decode are skipped. Raises InvalidInput naming `name`.
    """
    if not data:
        raise InvalidInput(f"{name} is empty: send the bytes of a {FORMATS} file")
    max_samples = int(max_seconds * SAMPLE_RATE)
    chunks, n_samples = [], 0
    try:
        container = av.open(io.BytesIO(data), metadata_errors="ignore", options={"format_whitelist": DEMUXERS})
    except av.error.FFmpegError as exc:
        raise InvalidInput(f"{name} could not be decoded as audio ({_describe(data)}): it is not a {FORMATS} "
                           f"file, or its header is damaged ({exc.strerror})") from None
    try:
        with container:
            if not container.streams.audio:
                raise InvalidInput(f"{name} holds no audio stream ({_describe(data)}); send a {FORMATS} file")
            declared = declared_seconds(container, data)
            if declared and declared > max_seconds:  # refused before a single packet is decoded
                raise InvalidInput(f"{name}'s header says it lasts {declared:.0f} s, longer than the limit of "
                                   f"{max_seconds:g} s; split it")
            stream = container.streams.audio[0]
            resampler, source = None, None
            for packet in container.demux(stream):  # the last, empty packet flushes the decoder
                try:
                    frames = packet.decode()
                except av.error.InvalidDataError:
                    continue  # a corrupt packet: the ffmpeg CLI logs it and goes on, so do we
                for frame in frames:
                    if (frame.format.name, frame.layout.name, frame.sample_rate) != source:
                        # first frame, or the stream changed format mid-way: ffmpeg reconfigures, so do we
                        n_samples += _flush(chunks, resampler)
                        resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
                        source = (frame.format.name, frame.layout.name, frame.sample_rate)
                    n_samples += _append(chunks, resampler.resample(frame))
                if n_samples > max_samples:
                    raise InvalidInput(f"{name} is longer than the limit of {max_seconds:g} s; split it")
            n_samples += _flush(chunks, resampler)
    except av.error.FFmpegError as exc:
        raise InvalidInput(f"{name} could not be decoded as audio ({_describe(data)}): {exc}") from None
    if n_samples == 0:
        raise InvalidInput(f"{name} decoded to no audio samples: it is empty, truncated or corrupt")
    decoded = n_samples / SAMPLE_RATE
    # A header that states the length (WAV, MP3 with a Xing/Info frame, M4A) exposes a file cut short, which
    # the ffmpeg CLI would decode in part without complaint; a partial transcript is not an answer.
    if declared and decoded < declared - max(TRUNCATION_SLACK, 0.02 * declared):
        raise InvalidInput(f"{name} is truncated or corrupt: its header says {declared:.2f} s "
                           f"but only {decoded:.2f} s decode")
    return np.concatenate(chunks).astype(np.float32) / 32768.0


def declared_seconds(container: av.container.InputContainer, data: bytes) -> float | None:
    """The duration the file's header states, or None where FFmpeg only estimates it.

    WAV, FLAC (STREAMINFO), M4A (movie header) and OGG (last page) state it; an MP3 states it only in a
    Xing/Info/VBRI frame, without which FFmpeg guesses from the file size and the first frame's bit rate
    (a VBR file that starts with silence would be "hours" long).
    """
    if not container.duration:
        return None
    if container.format.name == "mp3" and not _mp3_states_length(data):
        return None
    return container.duration / av.time_base


def _mp3_states_length(data: bytes) -> bool:
    """Whether the first MPEG frame (after any ID3v2 tag) is a Xing, Info or VBRI header frame."""
    start = 0
    if data[:3] == b"ID3" and len(data) >= 10:
        start = 10 + sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(data[6:10]))  # sync-safe size
        start += 10 if data[5] & 0x10 else 0  # footer
    head = data[start:start + 512]
    return any(tag in head for tag in (b"Xing", b"Info", b"VBRI"))


def check_pcm(pcm: np.ndarray, name: str = "PCM", max_seconds: float = MAX_SECONDS) -> np.ndarray:
    """Validate raw 16 kHz mono float samples and return them as a contiguous float32 vector."""
    pcm = np.asarray(pcm)
    if pcm.ndim != 1:
        raise InvalidInput(f"{name} must be a 1-D vector of 16 kHz mono samples, got shape {list(pcm.shape)}")
    if pcm.size == 0:
        raise InvalidInput(f"{name} is empty: send at least one 16 kHz mono sample")
    if pcm.size > max_seconds * SAMPLE_RATE:
        raise InvalidInput(f"{name} is {pcm.size / SAMPLE_RATE:.0f} s long, above the limit of {max_seconds:g} s")
    if not np.issubdtype(pcm.dtype, np.floating):
        raise InvalidInput(f"{name} must hold floats in [-1, 1], got {pcm.dtype}")
    if not np.isfinite(pcm).all():
        raise InvalidInput(f"{name} contains NaN or infinite samples")
    return np.ascontiguousarray(pcm, dtype=np.float32)


def _append(chunks: list, frames: list) -> int:
    arrays = [frame.to_ndarray().reshape(-1) for frame in frames]
    chunks.extend(arrays)
    return sum(a.size for a in arrays)


def _flush(chunks: list, resampler) -> int:
    """Collect the samples a resampler still buffers (its filter delay)."""
    return _append(chunks, resampler.resample(None)) if resampler is not None else 0


def _describe(data: bytes) -> str:
    return f"{len(data)} bytes starting {data[:8]!r}"
