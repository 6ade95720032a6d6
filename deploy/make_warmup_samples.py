"""Write the `model_warmup` sample files of every model (`model_repository/<model>/warmup/`).

Triton reads an `input_data_file` as the raw bytes of one batch element of that input, in row-major order; a
TYPE_STRING element is serialized as a 4-byte little-endian length followed by its bytes (Triton's
model_config.proto, ModelWarmup.Input.input_data_file). Sources: the speech and OCR clips under tests/data, a few
tens of KB at most. `yolov8` warms up on zero data (rendered by `python -m export yolo`); `detect` has no warm-up (its
BLS call would run before the server is READY, which Triton refuses). Run: `python deploy/make_warmup_samples.py`.
"""
from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
REPO = ROOT / "model_repository"
DATA = ROOT / "tests" / "data"


def string_element(data: bytes) -> bytes:
    """One TYPE_STRING element in Triton's serialized form."""
    return struct.pack("<I", len(data)) + data


def small_text_image() -> bytes:
    """The English sign photo at half size (240x128 JPEG, ~5 KB): detection and recognition at a small cost,
    since the warm-up runs 17 times at every start."""
    image = cv2.imread(str(DATA / "ocr_en_sign.jpg"))
    image = cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2), interpolation=cv2.INTER_AREA)
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def short_speech() -> bytes:
    """The first 3 s of the English speech clip as 16 kHz mono MP3 (~12 KB): decoding and one window."""
    return subprocess.run(["ffmpeg", "-v", "error", "-i", str(DATA / "speech_en.wav"), "-t", "3", "-ac", "1",
                           "-ar", "16000", "-b:a", "32k", "-f", "mp3", "-"], check=True, capture_output=True).stdout


def write(model: str, name: str, content: bytes) -> None:
    path = REPO / model / "warmup" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content)
    print(f"{path.relative_to(ROOT)}: {len(content):,} bytes")


def main() -> None:
    write("easyocr", "image", string_element(small_text_image()))
    write("whisper", "audio", string_element(short_speech()))
    # Greedy decoding only: warm-up exercises the kernels, not whisper's temperature fallback.
    write("whisper", "temperature", np.zeros(1, np.float32).tobytes())
    write("whisper", "word_timestamps", np.ones(1, np.bool_).tobytes())  # compiles whisper's DTW at load


if __name__ == "__main__":
    main()
