"""Build the test media: a 20 s 1280x720 H.264 + AAC MP4 with speech, photos, on-screen text and one scene cut.

    python tests/data/make_media.py [OUT_DIR]      # default build/test-media; prints the ground truth

Importable: `build(directory)` writes the files and `truth.json` and returns the ground truth (a dict).
Needs the Debian packages `ffmpeg`, `espeak-ng` and `fonts-dejavu-core`. Deterministic for one ffmpeg and
espeak-ng version: no random input, bit-exact flags, and x264's frame threading is deterministic.

`video.mp4`, and why it is made so:
* scene 1 (0-10 s) ultralytics' zidane.jpg, scene 2 (10-20 s) bus.jpg on a grey background: objects `detect`
  finds, and a hard cut at 10.0 s. Both scenes pan (the crop moves every frame), so consecutive frames are never
  identical and scene detection must tell motion from a cut.
* on-screen English text (DejaVu Sans Bold, white on a dark box), each over a half-open time range
  [start, end) on frame boundaries; one text spans the cut.
* two spoken sentences (espeak-ng), one per scene, at known start times; AAC at 48 kHz stereo, so decoding
  for whisper resamples and downmixes.
* a keyframe every 64 frames (2.56 s), x264's scene-cut keyframes off: the cut (frame 250) is mid-GOP, and
  samples 1 s or more apart often lie in a later GOP, so the seeking path is exercised. B-frames (pts != dts).
Derived from it:
* `speech.m4a`: the audio track alone (stream copy); `silent.mp4`: the video track alone;
* `video.mkv` (an index of keyframe cues read at the first seek), `video.avi` (no presentation times): copies;
* `broadcast.ts`: MPEG-TS, a container without a seek index, with ADTS-framed AAC;
* `speech.webm`: Opus audio alone in WebM, whose last packet says how many decoded samples to drop;
* `camera.mov`: big-endian PCM audio, as QuickTime cameras write (decoded by the client, not remuxed);
* `phone.mp4`: 640x360, no audio, a keyframe every second as phones write: keyframes alone find the scenes at
  one analysed frame a second;
* `rotated.mp4`: a display matrix saying "turn 90 degrees", as phones write for portrait video;
* `medium.mp4`: 640x360 with the same audio: real EasyOCR English reads every text on it at a quarter of the
  720p cost (~1.3 s a frame on a 2-core CPU);
* `small.mp4`: 320x180 with the same audio: where a test needs the pipeline's plumbing, not its pixels (OCR of a
  720p frame takes seconds of CPU);
* `truncated.mp4`: the first 60 % of video.mp4's bytes; its index, written first (`+faststart`), survives.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np

FPS = 25
WIDTH, HEIGHT = 1280, 720
SCENE_CUT = 10.0  # seconds; frame 250
DURATION = 20.0
KEYFRAME_INTERVAL = 64  # frames
# ultralytics' sample photos, found without importing ultralytics (and torch): seconds saved per test session
ASSETS = Path(importlib.util.find_spec("ultralytics").submodule_search_locations[0]) / "assets"
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
# (start seconds, sentence); each must end before the next starts (the last before the video ends)
SPEECH = [
    (1.0, "Welcome to the Trident media test. A man in a suit is standing in a room."),
    (11.0, "Now a city bus waits on the street. The quick brown fox jumps over the lazy dog."),
]
# (start, end, text, font size, x, y): visible on frames whose time t satisfies start <= t < end
TEXTS = [
    (1.0, 6.0, "TRIDENT MEDIA TEST", 64, "(w-text_w)/2", "h-140"),
    (7.0, 13.0, "CHANNEL 7 NEWS", 44, "40", "40"),
    (12.0, 18.0, "CITY BUS ROUTE 42", 64, "(w-text_w)/2", "h-140"),
]
SAMPLE_RATE = 22050  # espeak-ng's output rate


def _scaled(width: int, height: int) -> list[str]:
    """ffmpeg arguments for a smaller copy of the video: same keyframes, the audio copied."""
    return ["-vf", f"scale={width}:{height}", "-c:v", "libx264", "-preset", "veryfast", "-threads", "2",
            "-g", str(KEYFRAME_INTERVAL), "-keyint_min", str(KEYFRAME_INTERVAL), "-sc_threshold", "0",
            "-c:a", "copy", "-movflags", "+faststart"]


# file -> ffmpeg arguments that derive it from video.mp4 (see the module's docstring)
DERIVED = {
    "speech.m4a": ["-map", "0:a", "-c", "copy", "-movflags", "+faststart"],
    "silent.mp4": ["-map", "0:v", "-c", "copy", "-movflags", "+faststart"],
    "video.mkv": ["-c", "copy"],
    "video.avi": ["-c", "copy"],
    "broadcast.ts": ["-c", "copy"],
    "speech.webm": ["-vn", "-c:a", "libopus", "-b:a", "48k"],
    "camera.mov": ["-c:v", "copy", "-c:a", "pcm_s16be"],
    "phone.mp4": ["-an", "-vf", "scale=640:360", "-c:v", "libx264", "-preset", "veryfast", "-threads", "2",
                  "-g", str(FPS), "-keyint_min", str(FPS), "-sc_threshold", "0"],
    "rotated.mp4": ["-c", "copy", "-metadata:s:v:0", "rotate=90", "-movflags", "+faststart"],
    "medium.mp4": _scaled(640, 360),
    "small.mp4": _scaled(320, 180),
}
BITEXACT = ["-fflags", "+bitexact", "-flags:v", "+bitexact", "-flags:a", "+bitexact", "-map_metadata", "-1"]


def build(directory: str | Path) -> dict:
    """Write every test file into `directory` (created if missing) and return the ground truth."""
    for tool in ("ffmpeg", "espeak-ng"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed: apt-get install {tool}")
    if not Path(FONT).is_file():
        raise RuntimeError(f"{FONT} is missing: apt-get install fonts-dejavu-core")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    speech = _speech_track(out / "speech.wav")
    video = out / "video.mp4"
    _ffmpeg(
        "-i", str(ASSETS / "zidane.jpg"), "-i", str(ASSETS / "bus.jpg"),
        "-i", str(out / "speech.wav"),
        "-filter_complex", _filtergraph(), "-map", "[v]", "-map", "2:a",
        "-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p", "-threads", "2",
        "-g", str(KEYFRAME_INTERVAL), "-keyint_min", str(KEYFRAME_INTERVAL), "-sc_threshold", "0",
        "-c:a", "aac", "-b:a", "96k", "-ar", "48000", "-ac", "2",
        "-t", str(DURATION), "-movflags", "+faststart", *BITEXACT, str(video),
    )
    (out / "speech.wav").unlink()
    for name, args in DERIVED.items():
        _ffmpeg("-i", str(video), *args, *BITEXACT, str(out / name))
    data = video.read_bytes()
    (out / "truncated.mp4").write_bytes(data[: int(len(data) * 0.6)])
    truth = {
        "video": video.name, "duration": DURATION, "fps": FPS, "width": WIDTH, "height": HEIGHT,
        "keyframe_interval_frames": KEYFRAME_INTERVAL, "scene_cuts": [SCENE_CUT], "speech": speech,
        "texts": [{"start": start, "end": end, "text": text} for start, end, text, *_ in TEXTS],
        "derived": [*DERIVED, "truncated.mp4"],
    }
    (out / "truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    return truth


def _speech_track(path: Path) -> list[dict]:
    """Speak each sentence at its start time into one mono WAV of the video's length; return their times."""
    track = np.zeros(int(DURATION * SAMPLE_RATE), dtype=np.int16)
    spoken = []
    for start, sentence in SPEECH:
        samples = _espeak(sentence, path.with_suffix(".sentence.wav"))
        begin = int(start * SAMPLE_RATE)
        end = begin + samples.size
        next_start = min([s for s, _ in SPEECH if s > start] + [DURATION])
        if end > next_start * SAMPLE_RATE:
            raise RuntimeError(f"the sentence starting at {start} s lasts {samples.size / SAMPLE_RATE:.2f} s "
                               f"and overlaps what follows at {next_start} s")
        track[begin:end] = samples
        spoken.append({"start": start, "end": round(end / SAMPLE_RATE, 3), "text": sentence})
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(track.tobytes())
    return spoken


def _espeak(sentence: str, path: Path) -> np.ndarray:
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(path), sentence], check=True)
    with wave.open(str(path), "rb") as spoken:
        if (spoken.getframerate(), spoken.getnchannels(), spoken.getsampwidth()) != (SAMPLE_RATE, 1, 2):
            raise RuntimeError(f"espeak-ng wrote an unexpected WAV format: {spoken.getparams()}")
        samples = np.frombuffer(spoken.readframes(spoken.getnframes()), dtype=np.int16)
    path.unlink()
    return samples


def _filtergraph() -> str:
    def scene(frames: int) -> str:
        # the photo, scaled once, repeated for the scene's frames; then a slow horizontal pan: the 1360x765
        # picture is cropped to 1280x720 at an x that moves every frame
        return (f"loop=loop={frames - 1}:size=1,setpts=N/{FPS}/TB,"
                f"crop={WIDTH}:{HEIGHT}:x='40+40*sin(PI*t/6)':y=22,setsar=1")

    cut = round(SCENE_CUT * FPS)
    scene1 = f"[0:v]scale=1360:765,{scene(cut)}[s1]"
    background = "pad=1360:765:(ow-iw)/2:(oh-ih)/2:color=0x505860"
    scene2 = f"[1:v]scale=-2:{HEIGHT},{background},{scene(round(DURATION * FPS) - cut)}[s2]"
    texts = ",".join(
        f"drawtext=fontfile={FONT}:text='{text}':fontsize={size}:fontcolor=white:box=1:boxcolor=black@0.65"
        f":boxborderw=14:x={x}:y={y}:enable='gte(t,{start})*lt(t,{end})'"
        for start, end, text, size, x, y in TEXTS
    )
    return f"{scene1};{scene2};[s1][s2]concat=n=2:v=1:a=0,{texts},format=yuv420p[v]"


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


if __name__ == "__main__":
    print(json.dumps(build(sys.argv[1] if len(sys.argv) > 1 else "build/test-media"), indent=2))
