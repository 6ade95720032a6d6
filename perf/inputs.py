"""Realistic benchmark inputs and the `--input-data` JSON files perf_analyzer reads.

* photos: ultralytics' two bundled photos (bus.jpg, zidane.jpg) cropped to the aspect ratio and resized to
  640x480, 1280x720 (16:9 frames), 1280x320 (wide banners) and 720x1280 (portrait), as JPEG (quality 90);
* letterboxed: the 640x480 photos as the float32 tensors `detect` sends `yolov8`: rect (predict()'s default,
  [3, 480, 640]) and, as letterboxed-square, [3, 640, 640] (detect's `letterbox: square`);
* speech: WAV clips (16 kHz mono) of ~5 s, 30 s and 2 min built from the committed espeak-ng sentences of
  tests/data (English and Korean, with pauses between sentences);
* pages: 1280x720 JPEG pages with ~20 lines of mixed Korean and English text (Nanum fonts from Debian's
  `fonts-nanum` for Hangul; without them the pages are English only and the manifest says so).

A BYTES element of `--input-data` is the serialized string-tensor form, {"b64": base64(<uint32 LE length> +
<bytes>)}: a plain "b64" of the raw file would be read as a length prefix (shared/notes/triton-facts.md).
Numeric tensors are {"b64": base64(raw little-endian values)} with their "shape".

    python -m perf.inputs [--out perf/data]     # writes the files and manifest.json, prints the manifest
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import struct
import sys
import wave
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ROOT / "perf" / "data"
SPEECH = [ROOT / "tests" / "data" / "speech_en.wav", ROOT / "tests" / "data" / "speech_ko.wav"]
SAMPLE_RATE = 16000
IMAGE_SIZES = {"640x480": (640, 480), "1280x720": (1280, 720), "1280x320": (1280, 320), "720x1280": (720, 1280)}
CLIP_SECONDS = {"5s": 5.0, "30s": 30.0, "2min": 120.0}
DEJAVU = Path("/usr/share/fonts/truetype/dejavu")
NANUM = Path("/usr/share/fonts/truetype/nanum")
LATIN_FONTS = [DEJAVU / "DejaVuSans.ttf", DEJAVU / "DejaVuSerif.ttf", DEJAVU / "DejaVuSansMono.ttf"]
HANGUL_FONTS = [NANUM / "NanumGothic.ttf", NANUM / "NanumMyeongjo.ttf", NANUM / "NanumBarunGothic.ttf"]
ENGLISH = ("triton inference server batches requests from many clients while the detector finds text regions "
           "and the recogniser reads each line invoice total order number 2026 street avenue open daily").split()
KOREAN = ("서울 영업시간 안내 주문 번호 합계 금액 출구 주차장 오늘 내일 회의 자료 확인 부탁드립니다 "
          "지하철 버스 정류장 도서관 병원 학교 커피 한잔 감사합니다").split()


@dataclass
class InputSet:
    """One kind of input of one model: the files, and the perf_analyzer JSON that sends them in turn."""

    name: str  # e.g. "jpeg-640x480"
    model: str  # the model it feeds
    files: list[str]  # source files, relative to the data folder
    input_data: str  # the perf_analyzer --input-data file, relative to the data folder
    unit: str = "images"  # what one request carries: images, audio seconds...
    units_per_request: float = 1.0  # e.g. clip seconds for speech (mean over the files)
    note: str = ""
    letterbox: str = ""  # yolov8's tensors: the letterbox mode they were made with (rect | square)


@dataclass
class Manifest:
    folder: Path
    sets: dict[str, InputSet] = field(default_factory=dict)

    def path(self, relative: str) -> Path:
        return self.folder / relative

    def to_json(self) -> dict:
        return {"folder": str(self.folder), "sets": {k: asdict(v) for k, v in self.sets.items()}}

    @classmethod
    def load(cls, folder: Path) -> "Manifest":
        data = json.loads((folder / "manifest.json").read_text())
        return cls(Path(folder), {k: InputSet(**v) for k, v in data["sets"].items()})


def serialize_bytes(data: bytes) -> dict:
    """A BYTES element in perf_analyzer's JSON: the 4-byte little-endian length, then the bytes, base64."""
    return {"b64": base64.b64encode(struct.pack("<I", len(data)) + data).decode("ascii")}


def deserialize_bytes(element: dict) -> bytes:
    """Inverse of `serialize_bytes` (checks that the length prefix covers exactly the payload)."""
    raw = base64.b64decode(element["b64"])
    (length,) = struct.unpack("<I", raw[:4])
    if length != len(raw) - 4:
        raise ValueError(f"length prefix says {length} bytes, payload has {len(raw) - 4}")
    return raw[4:]


def read_entry(entry: dict) -> dict[str, np.ndarray]:
    """One entry of an --input-data file as the tensors perf_analyzer sends (with the batch axis)."""
    tensors = {}
    for name, element in entry.items():
        if "shape" not in element:  # BYTES
            tensors[name] = np.array([[deserialize_bytes(element)]], dtype=np.object_)
        elif "b64" in element:
            tensors[name] = np.frombuffer(base64.b64decode(element["b64"]), "<f4").reshape(1, *element["shape"])
        else:
            tensors[name] = np.asarray(element["content"], np.float32).reshape(1, *element["shape"])
    return tensors


def write_input_data(path: Path, entries: list[dict]) -> None:
    """perf_analyzer's --input-data file: {"data": [ {input: element, ...}, ... ]}, sent in turn."""
    path.write_text(json.dumps({"data": entries}))


def photo_jpegs(size: tuple[int, int]) -> dict[str, bytes]:
    """ultralytics' bundled photos, centre-cropped to the aspect ratio of `size`, resized, as JPEG."""
    from ultralytics.utils import ASSETS

    width, height = size
    out = {}
    for path in sorted(ASSETS.glob("*.jpg")):
        image = cv2.imread(str(path))
        h, w = image.shape[:2]
        scale = min(w / width, h / height)
        cw, ch = int(width * scale), int(height * scale)
        x, y = (w - cw) // 2, (h - ch) // 2
        image = cv2.resize(image[y:y + ch, x:x + cw], size, interpolation=cv2.INTER_AREA)
        ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        out[f"{path.stem}_{width}x{height}.jpg"] = jpeg.tobytes()
    return out


def letterboxed(jpeg: bytes, mode: str = "rect") -> np.ndarray:
    """The float32 [3, H, W] tensor `detect` sends to `yolov8` for this image in a letterbox mode (same code path)."""
    import torch

    from trident_serving.images import decode_image
    from trident_serving.yolo import letterbox, to_model_input

    return to_model_input([letterbox(decode_image(jpeg), mode=mode)], torch.device("cpu"))[0].numpy()


def speech_clip(seconds: float, first: int = 0) -> bytes:
    """A 16 kHz mono WAV of `seconds`: the committed sentences in turn (from `first`), 0.6 s pauses between."""
    from trident_serving.audio import decode_audio

    sentences = [decode_audio(p.read_bytes()) for p in SPEECH]
    pause = np.zeros(int(0.6 * SAMPLE_RATE), np.float32)
    parts, total, i = [], 0, first
    while total < seconds * SAMPLE_RATE:
        parts += [sentences[i % len(sentences)], pause]
        total += len(parts[-2]) + len(pause)
        i += 1
    audio = np.concatenate(parts)[: int(seconds * SAMPLE_RATE)]
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return out.getvalue()


def text_page(seed: int, size: tuple[int, int] = (1280, 720), lines: int = 20) -> tuple[bytes, bool]:
    """A JPEG page with `lines` lines of Korean and English words (sizes 16-26 px); returns (jpeg, has_hangul)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    hangul = [p for p in HANGUL_FONTS if p.exists()]
    latin = [p for p in LATIN_FONTS if p.exists()]
    width, height = size
    base = int(rng.integers(220, 250))
    background = rng.normal(0, 3, (height, width, 1)) + np.array([base, base - 4, base - 10])
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    row = height / lines
    for i in range(lines):
        korean = bool(hangul) and i % 2 == 0
        fonts = hangul if korean else latin
        font_size = int(rng.integers(16, 27))
        font = (ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), font_size) if fonts
                else ImageFont.load_default(font_size))
        words = rng.choice(KOREAN if korean else ENGLISH, size=int(rng.integers(3, 8)))
        if korean:  # mixed lines, as on real Korean documents: a number or an English word among the Hangul
            words = list(words) + [str(int(rng.integers(10, 9999)))]
        x = int(rng.integers(12, width // 3))
        ink = tuple(int(v) for v in rng.integers(0, 60, 3))
        draw.text((x, int(i * row) + 4), " ".join(words), font=font, fill=ink)
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, 90])
    return jpeg.tobytes(), bool(hangul)


def generate(folder: Path = DEFAULT_DIR, pages: int = 4) -> Manifest:
    """Write every input file and input-data JSON into `folder` (deterministic), plus manifest.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(folder)

    def save(name: str, data: bytes) -> str:
        (folder / name).write_bytes(data)
        return name

    for label, size in IMAGE_SIZES.items():
        photos = {name: save(name, data) for name, data in photo_jpegs(size).items()}
        entries = [{"IMAGE": serialize_bytes((folder / name).read_bytes())} for name in photos]
        write_input_data(folder / f"detect-{label}.json", entries)
        manifest.sets[f"jpeg-{label}"] = InputSet(f"jpeg-{label}", "detect", list(photos), f"detect-{label}.json")
        if label == "640x480":
            for name, mode, shape in (("letterboxed", "rect", "[3,480,640]"),
                                      ("letterboxed-square", "square", "[3,640,640]")):
                tensors = [letterboxed((folder / photo).read_bytes(), mode) for photo in photos]
                entries = [{"images": {"b64": base64.b64encode(t.astype("<f4").tobytes()).decode("ascii"),
                                       "shape": list(t.shape)}} for t in tensors]
                write_input_data(folder / f"yolov8-{name}.json", entries)
                manifest.sets[name] = InputSet(name, "yolov8", list(photos), f"yolov8-{name}.json",
                                               note=f"float32 {shape} of the 640x480 JPEGs", letterbox=mode)
    for label, seconds in CLIP_SECONDS.items():
        clips = [save(f"speech_{label}_{i}.wav", speech_clip(seconds, first=i)) for i in range(2)]
        # TEMPERATURE [0]: greedy decoding, deterministic; the in-process baseline uses the same.
        entries = [{"AUDIO": serialize_bytes((folder / c).read_bytes()),
                    "TEMPERATURE": {"content": [0.0], "shape": [1]}} for c in clips]
        write_input_data(folder / f"whisper-{label}.json", entries)
        manifest.sets[f"speech-{label}"] = InputSet(f"speech-{label}", "whisper", clips, f"whisper-{label}.json",
                                                    unit="audio s", units_per_request=seconds,
                                                    note="greedy (TEMPERATURE [0])")
    names, hangul = [], True
    for i in range(pages):
        data, has_hangul = text_page(seed=i)
        hangul &= has_hangul
        names.append(save(f"page_{i}.jpg", data))
    write_input_data(folder / "easyocr-pages.json", [{"IMAGE": serialize_bytes((folder / n).read_bytes())}
                                                     for n in names])
    note = ("~20 lines, Korean + English" if hangul
            else "~20 lines, English only (no Hangul font: apt install fonts-nanum)")
    manifest.sets["pages-1280x720"] = InputSet("pages-1280x720", "easyocr", names, "easyocr-pages.json", note=note)
    (folder / "manifest.json").write_text(json.dumps(manifest.to_json(), indent=1, ensure_ascii=False))
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.inputs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR, help="folder to write (default: perf/data)")
    args = parser.parse_args(argv)
    manifest = generate(args.out)
    print(json.dumps(manifest.to_json(), indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
