"""The client's media layer (trident.media) on the generated test media; no server needed.

Frames are checked against a plain decode of every frame; audio against the server's own decoder
(`trident_serving.audio.decode_audio`) run on the original file.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from PIL import Image

from tests.data import make_media
from trident import media
from trident_serving.audio import decode_audio

CUT = make_media.SCENE_CUT
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def reference_frames(media_dir) -> dict[int, str]:
    """Frame number -> digest of its BGR pixels, from a plain sequential decode of every frame of video.mp4."""
    with av.open(str(media_dir / "video.mp4")) as container:
        stream = container.streams.video[0]
        return {round(frame.time * make_media.FPS): _digest(frame.to_ndarray(format="bgr24"))
                for frame in container.decode(stream)}


@pytest.fixture
def seeks(monkeypatch) -> list[float]:
    """The times the sampler seeks to (the real seek runs; its calls are recorded)."""
    made = []
    seek = media._VideoReader._seek

    def recording(reader, t):
        made.append(t)
        return seek(reader, t)

    monkeypatch.setattr(media._VideoReader, "_seek", recording)
    return made


def _digest(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def test_probe(media_dir):
    info = media.probe(media_dir / "video.mp4")
    assert (info.kind, info.has_video, info.has_audio) == ("video", True, True)
    assert (info.width, info.height, info.fps, info.frames) == (1280, 720, 25.0, 500)
    assert (info.video_codec, info.audio_codec, info.sample_rate, info.channels) == ("h264", "aac", 48000, 2)
    assert info.duration == pytest.approx(make_media.DURATION)
    assert info.keyframe_interval == pytest.approx(make_media.KEYFRAME_INTERVAL / make_media.FPS)
    assert info.rotation == 0 and info.size_bytes == (media_dir / "video.mp4").stat().st_size

    rotated = media.probe(media_dir / "rotated.mp4")
    assert (rotated.rotation, rotated.width, rotated.height) == (90, 720, 1280)
    silent = media.probe(media_dir / "silent.mp4")
    assert (silent.kind, silent.has_video, silent.has_audio, silent.audio_codec) == ("video", True, False, None)
    audio = media.probe(media_dir / "speech.m4a")
    assert (audio.kind, audio.has_video, audio.has_audio, audio.width) == ("audio", False, True, None)
    assert media.probe(media_dir / "broadcast.ts").keyframe_interval is None  # MPEG-TS has no index
    image = media.probe(make_media.ASSETS / "bus.jpg")
    assert (image.kind, image.width, image.height, image.duration) == ("image", 810, 1080, None)


@pytest.mark.parametrize("name, fps, seek", [
    ("video.mp4", 0.3, True), ("video.mp4", 1.0, True), ("video.mp4", 0.3, False), ("video.mkv", 0.3, True),
])
def test_fps_sampling_gives_the_frame_shown_at_each_time(media_dir, reference_frames, seeks, name, fps, seek):
    frames = list(media.sample_frames(media_dir / name, fps=fps, seek=seek))
    first = frames[0].frame_time  # 0 in MP4; 0.021 s in MKV (shifted so that the AAC priming starts at 0)
    expected_times = [k / fps for k in range(int(np.ceil((first + make_media.DURATION) * fps - 1e-9)))]
    assert [f.time for f in frames] == expected_times
    assert [f.index for f in frames] == list(range(len(expected_times)))
    shown = [max(0, int((t - first) * make_media.FPS + 1e-9)) for t in expected_times]  # last frame at or before t
    for frame, number in zip(frames, shown):
        assert frame.frame_time == pytest.approx(first + number / make_media.FPS, abs=1e-9)
        assert frame.image.shape == (720, 1280, 3) and frame.image.dtype == np.uint8
        assert _digest(frame.image) == reference_frames[number], f"frame at {frame.time:.3f} s"
    # a seek wherever a keyframe lies at or before the next sample and over SEEK_MIN_SKIP_S after the frame
    # decoded last (the one after the previous sample's): 5 of 6 samples at 0.3 fps, 4 of 20 at 1 fps
    keyframes = first + np.arange(0, make_media.DURATION, make_media.KEYFRAME_INTERVAL / make_media.FPS)
    decoded_last = [first + (number + 1) / make_media.FPS for number in shown]
    expected_seeks = [t for t, after in zip(expected_times[1:], decoded_last)
                      if ((keyframes > after + media.SEEK_MIN_SKIP_S) & (keyframes <= t + 1e-9)).any()]
    expected_seeks = expected_seeks if seek else []
    assert seeks == expected_seeks and (seeks or not seek)


@pytest.mark.parametrize("name", ["broadcast.ts", "video.avi"])
def test_sampling_without_an_index_or_timestamps_decodes_sequentially(media_dir, reference_frames, seeks, name):
    # both hold video.mp4's H.264 stream copied. MPEG-TS has no index, and shows the pictures 0.01 s after the
    # audio starts; AVI has no presentation times (FFmpeg's guesses are out of order with B-frames)
    frames = list(media.sample_frames(media_dir / name, fps=1))
    first = frames[0].frame_time
    assert 0 <= first < 0.04 and seeks == []
    assert [f.time for f in frames] == list(range(21 if first else 20))  # the video ends at first + 20 s
    for frame in frames:
        assert max(frame.time, first) - 0.04 < frame.frame_time <= max(frame.time, first) + 1e-9
        assert _digest(frame.image) == reference_frames[round((frame.frame_time - first) * make_media.FPS)]


@pytest.mark.parametrize("analysis_fps", [2.0, 0.75])
def test_scene_change_is_found_within_one_analysed_frame(media_dir, reference_frames, analysis_fps):
    scenes = list(media.sample_frames(media_dir / "video.mp4", scenes=True, analysis_fps=analysis_fps))
    assert [s.index for s in scenes] == [0, 1]
    assert scenes[0].time == 0.0
    assert CUT <= scenes[1].frame_time <= scenes[1].time < CUT + 1 / analysis_fps
    for scene in scenes:
        assert _digest(scene.image) == reference_frames[round(scene.frame_time * make_media.FPS)]


def test_scenes_from_keyframes_alone_where_keyframes_are_frequent(media_dir, monkeypatch):
    decoded_keyframes_only = []
    keyframes = media._VideoReader.keyframes

    def recording(reader):
        decoded_keyframes_only.append(reader.path.name)
        return keyframes(reader)

    monkeypatch.setattr(media._VideoReader, "keyframes", recording)
    scenes = list(media.sample_frames(media_dir / "phone.mp4", scenes=True))  # 1 analysed frame a second
    assert [s.time for s in scenes] == [0.0, CUT]  # a keyframe a second; the cut falls on one
    assert decoded_keyframes_only == ["phone.mp4"]
    list(media.sample_frames(media_dir / "video.mp4", scenes=True, analysis_fps=1.0))
    assert decoded_keyframes_only == ["phone.mp4"]  # keyframes 2.56 s apart are too few at 1 a second


def test_rotated_video_frames_come_out_upright(media_dir):
    turned = next(media.sample_frames(media_dir / "rotated.mp4", fps=1)).image
    upright = next(media.sample_frames(media_dir / "video.mp4", fps=1)).image
    assert np.array_equal(turned, np.rot90(upright))
    # as the ffmpeg program shows it (it applies the display matrix)
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(media_dir / "rotated.mp4"), "-frames:v", "1",
                          "-f", "rawvideo", "-pix_fmt", "bgr24", "-"], capture_output=True, check=True).stdout
    shown = np.frombuffer(raw, np.uint8).reshape(1280, 720, 3)
    assert np.abs(shown.astype(np.int16) - turned).mean() < 1.0


@pytest.mark.parametrize("name, container", [
    ("video.mp4", "mp4"), ("speech.m4a", "mp4"), ("camera.mov", "pcm"),  # 48 kHz stereo PCM: smaller decoded
    # the committed speech files (tests/data): each remuxable codec
    ("speech_en.mp3", "mp3"), ("speech_en.ogg", "ogg"), ("speech_en.flac", "flac"), ("speech_en.wav", "wav"),
])
def test_audio_sent_decodes_to_the_samples_of_the_original(media_dir, name, container):
    path = media_dir / name if (media_dir / name).exists() else DATA / name
    track = media.extract_audio(path)
    assert (track.format, track.start) == (container, 0.0)
    sent = decode_audio(track.data) if isinstance(track.data, bytes) else track.data
    original = decode_audio(path.read_bytes())
    assert sent.dtype == np.float32 and np.array_equal(sent, original)  # byte-exact
    assert track.duration == pytest.approx(original.size / media.SAMPLE_RATE, abs=0.05)
    if container == "pcm":
        assert track.data.size == original.size
    elif path.parent == DATA:  # the packets as they were: the size of the file
        assert abs(len(track.data) - path.stat().st_size) < 0.01 * path.stat().st_size
    else:  # no bigger than the AAC-only file
        assert len(track.data) < 1.01 * (media_dir / "speech.m4a").stat().st_size


@pytest.mark.parametrize("name, container", [("broadcast.ts", "mp4"), ("speech.webm", "ogg")])
def test_audio_of_a_container_the_server_refuses_is_remuxed(media_dir, name, container):
    # the server demuxes neither MPEG-TS nor WebM. TS: ADTS AAC goes into MP4 (FFmpeg's ADTS-to-MP4 bitstream
    # filter). WebM: Opus into Ogg, with the padding WebM drops at the end (DiscardPadding) kept dropped
    track = media.extract_audio(media_dir / name)
    assert track.format == container and track.duration == pytest.approx(make_media.DURATION, abs=0.05)
    with av.open(str(media_dir / name)) as original:  # decoded as the server decodes (checked above)
        samples = media._decode_pcm(original, original.streams.audio[0])
    assert np.array_equal(decode_audio(track.data), samples)


def test_silent_video_and_audio_only_file(media_dir):
    assert media.extract_audio(media_dir / "silent.mp4") is None
    assert len(list(media.sample_frames(media_dir / "silent.mp4", fps=1))) == 20
    assert list(media.sample_frames(media_dir / "speech.m4a", fps=1)) == []
    assert list(media.sample_frames(media_dir / "speech.m4a", scenes=True)) == []


def test_image_is_one_frame_at_time_zero(tmp_path):
    for path in (make_media.ASSETS / "bus.jpg", _rotated_jpeg(tmp_path)):
        frames = list(media.sample_frames(path, fps=5))
        assert [(f.index, f.time, f.frame_time) for f in frames] == [(0, 0.0, 0.0)]
        assert np.array_equal(frames[0].image, cv2.imread(str(path)))  # EXIF orientation applied, as OpenCV
        assert list(media.sample_frames(path, scenes=True))[0].image.shape == frames[0].image.shape
        assert media.extract_audio(path) is None


def _rotated_jpeg(directory: Path) -> Path:
    path = directory / "portrait.jpg"
    with Image.open(make_media.ASSETS / "zidane.jpg") as image:
        exif = image.getexif()
        exif[0x0112] = 6  # "turn 90 degrees clockwise to show"
        image.save(path, exif=exif)
    assert media.probe(path).width == 720
    return path


def test_folder_expands_to_its_media_files_sorted(media_dir, tmp_path):
    shutil.copy(media_dir / "silent.mp4", tmp_path / "b.mp4")
    shutil.copy(make_media.ASSETS / "bus.jpg", tmp_path / "a.JPG")
    (tmp_path / "notes.txt").write_text("not media")
    (tmp_path / "sub").mkdir()
    shutil.copy(media_dir / "speech.m4a", tmp_path / "sub" / "c.m4a")
    (tmp_path / ".thumbnails").mkdir()
    shutil.copy(make_media.ASSETS / "bus.jpg", tmp_path / ".thumbnails" / "x.jpg")
    found, skipped = media.expand([tmp_path, tmp_path / "b.mp4", tmp_path / "missing.mp4"])
    assert found == [tmp_path / "a.JPG", tmp_path / "b.mp4", tmp_path / "sub" / "c.m4a"]
    assert [(path.name, reason.split(" (")[0]) for path, reason in skipped] == [
        ("notes.txt", "not a media file"), ("missing.mp4", "does not exist")]


def test_truncated_video_raises_a_media_error_naming_it(media_dir):
    path = media_dir / "truncated.mp4"
    assert media.probe(path).duration == pytest.approx(20.0)  # the header survives; the content does not
    for read in (lambda: list(media.sample_frames(path, fps=1)),
                 lambda: list(media.sample_frames(path, fps=1, seek=False)),
                 lambda: list(media.sample_frames(path, scenes=True)),
                 lambda: media.extract_audio(path)):
        with pytest.raises(media.MediaError, match=r"truncated\.mp4: is truncated or corrupt: its header says the "
                                                   r"(video|audio) lasts 20\.00 s, but only 1\d\.\d\d s"):
            read()


@pytest.mark.parametrize("name, content, problem", [
    ("garbage.mp4", bytes(range(256)) * 40, "cannot be read as audio or video"),
    ("text.mkv", b"hello world\n", "cannot be read as audio or video"),
    ("empty.mp4", b"", "is empty"),
    ("cut.jpg", None, "is a corrupt or truncated image"),
    ("notes.txt", b"text", "is not a media file"),
], ids=["garbage", "text", "empty", "cut-jpeg", "unknown-extension"])
def test_corrupt_or_unknown_file_raises_a_media_error_naming_it(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_bytes(content if content is not None else (make_media.ASSETS / "bus.jpg").read_bytes()[:30000])
    with pytest.raises(media.MediaError, match=problem) as raised:
        list(media.sample_frames(path, fps=1))
    assert str(raised.value).startswith(f"{path}: ") and raised.value.path == path
    if name != "cut.jpg":  # the cut image's header is whole, and probing reads no more
        with pytest.raises(media.MediaError, match=problem):
            media.probe(path)


def test_bad_arguments():
    for kwargs in ({}, {"fps": 1, "scenes": True}, {"fps": 0}, {"fps": float("nan")}):
        with pytest.raises(ValueError, match="fps"):
            list(media.sample_frames("any.mp4", **kwargs))
