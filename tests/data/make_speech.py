"""Regenerate the speech test files: espeak-ng WAVs re-encoded with PyAV to FLAC, MP3, OGG/Opus and M4A/AAC.

Needs the `espeak-ng` program (`apt-get install espeak-ng`). Run from anywhere:
    python tests/data/make_speech.py
The lossy copies use other rates and channel counts than the 22.05 kHz mono WAV on purpose, so that tests
exercise resampling and downmixing.
"""
import subprocess
from pathlib import Path

import av

HERE = Path(__file__).parent
SENTENCES = {
    "en": "The quick brown fox jumps over the lazy dog. Speech recognition turns sound into text.",
    "ko": "안녕하세요. 오늘은 날씨가 아주 좋습니다. 음성 인식 시험입니다.",
}
# extension -> (container format, codec, sample rate, layout)
ENCODINGS = {
    "flac": ("flac", "flac", 22050, "mono"),
    "mp3": ("mp3", "libmp3lame", 44100, "stereo"),
    "ogg": ("ogg", "libopus", 48000, "stereo"),
    "m4a": ("mp4", "aac", 44100, "stereo"),
}


def encode(source: Path, target: Path, fmt: str, codec: str, rate: int, layout: str) -> None:
    """Re-encode `source` into `target`, resampling to the codec's format, `rate` and `layout`."""
    with av.open(str(source)) as inp, av.open(str(target), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        stream.bit_rate = 48000
        stream.codec_context.open()  # fixes the frame size the resampler must produce
        resampler = av.AudioResampler(
            format=stream.codec_context.format, layout=layout, rate=rate, frame_size=stream.codec_context.frame_size
        )
        for frame in [*inp.decode(audio=0), None]:
            for resampled in resampler.resample(frame):
                out.mux(stream.encode(resampled))
        out.mux(stream.encode(None))


def main() -> None:
    for language, text in SENTENCES.items():
        wav = HERE / f"speech_{language}.wav"
        subprocess.run(["espeak-ng", "-v", language, "-s", "150", "-w", str(wav), text], check=True)
        for ext, encoding in ENCODINGS.items():
            encode(wav, wav.with_suffix("." + ext), *encoding)
    for path in sorted(HERE.glob("speech_*")):
        print(f"{path.name:20s} {path.stat().st_size:8d} bytes")


if __name__ == "__main__":
    main()
