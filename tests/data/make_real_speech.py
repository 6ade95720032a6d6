"""Regenerate the real-weights speech clips: espeak-ng sentences with numbers and names, as 16 kHz mono FLAC.

Needs the `espeak-ng` program (`apt-get install espeak-ng`); the tests only read the committed files. Run:
    python tests/data/make_real_speech.py
Writes real_<id>.flac and real_speech.json (id -> language, voice, speed, the sentence spoken). Several voices
and speeds; numbers and names on purpose (they are where recognisers and text normalisation disagree).
"""
import json
import subprocess
import tempfile
from pathlib import Path

import av

HERE = Path(__file__).parent
RATE = 16000  # whisper's rate: the clips stay small and lossless
CLIPS = {
    "en_carter": ("en", "en-us", 160, "Doctor Emily Carter will meet John Baker at four o'clock on Friday in room 27."),
    "en_brown": ("en", "en-gb+f3", 135, "Please send 250 dollars to Michael Brown before the 15th of March."),
    "en_london": ("en", "en-us+m3", 185, "The train to London leaves at 9 with 12 passengers and 3 dogs."),
    "ko_greeting": ("ko", "ko", 120, "안녕하세요. 만나서 반갑습니다. 감사합니다."),
}


def to_flac(source: Path, target: Path) -> None:
    """Re-encode `source` as 16 kHz mono FLAC."""
    with av.open(str(source)) as inp, av.open(str(target), "w", format="flac") as out:
        stream = out.add_stream("flac", rate=RATE, layout="mono")
        resampler = av.AudioResampler(format=stream.codec_context.format, layout="mono", rate=RATE)
        for frame in [*inp.decode(audio=0), None]:
            for resampled in resampler.resample(frame):
                out.mux(stream.encode(resampled))
        out.mux(stream.encode(None))


def main() -> None:
    truth = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (language, voice, speed, text) in CLIPS.items():
            wav = Path(tmp) / f"{name}.wav"
            subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(wav), text], check=True)
            to_flac(wav, HERE / f"real_{name}.flac")
            truth[name] = {"language": language, "voice": voice, "speed": speed, "text": text}
    (HERE / "real_speech.json").write_text(json.dumps(truth, indent=2, ensure_ascii=False) + "\n")
    for path in sorted(HERE.glob("real_*")):
        print(f"{path.name:24s} {path.stat().st_size:8d} bytes")


if __name__ == "__main__":
    main()
