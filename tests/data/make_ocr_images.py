"""Render the committed OCR test images `tests/data/ocr_*` and their ground truth `ocr_truth.json`.

Needs the DejaVu fonts and Debian's `fonts-nanum` (Korean). Deterministic: rerunning it rewrites the same
images, so the committed files can be regenerated and reviewed.

    python tests/data/make_ocr_images.py
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
DEJAVU = Path("/usr/share/fonts/truetype/dejavu")
NANUM = Path("/usr/share/fonts/truetype/nanum")

SANS = DEJAVU / "DejaVuSans.ttf"
SANS_BOLD = DEJAVU / "DejaVuSans-Bold.ttf"
SERIF = DEJAVU / "DejaVuSerif.ttf"
MONO = DEJAVU / "DejaVuSansMono.ttf"
GOTHIC = NANUM / "NanumGothic.ttf"
MYEONGJO = NANUM / "NanumMyeongjo.ttf"
SQUARE_BOLD = NANUM / "NanumSquareB.ttf"


def _font(path: Path, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), size)


def _page(size: tuple[int, int], lines: list[tuple[str, Path, int]], margin: int = 24,
          background: int = 255, ink: int = 0) -> Image.Image:
    """Draw (text, font, size) lines top to bottom, each at its own font size."""
    image = Image.new("RGB", size, (background,) * 3)
    draw = ImageDraw.Draw(image)
    y = margin
    for text, font_path, font_size in lines:
        draw.text((margin, y), text, font=_font(font_path, font_size), fill=(ink,) * 3)
        y += int(font_size * 1.7)
    return image


def english_sizes() -> tuple[Image.Image, list[str]]:
    lines = [
        ("Triton serves three models", SANS, 34),
        ("The quick brown fox jumps", SERIF, 28),
        ("over the lazy dog 1234567890", MONO, 24),
        ("Invoice total: $482.50", SANS_BOLD, 22),
        ("Please call before noon", SERIF, 20),
    ]
    return _page((560, 320), lines, margin=16), [t for t, _, _ in lines]


def english_sign() -> tuple[Image.Image, list[str]]:
    # light text on a dark sign, saved as JPEG: exercises inverted contrast and compression noise
    lines = [("EXIT ONLY", SANS_BOLD, 48), ("Parking level 3", SANS, 30), ("Open 24 hours", SERIF, 26)]
    return _page((480, 256), lines, margin=30, background=30, ink=235), [t for t, _, _ in lines]


def korean_mixed() -> tuple[Image.Image, list[str]]:
    lines = [
        ("안녕하세요 반갑습니다", GOTHIC, 34),
        ("서울특별시 강남구", MYEONGJO, 28),
        ("한국어 OCR 테스트 2026", SQUARE_BOLD, 24),
        ("Korean and English 함께", GOTHIC, 22),
        ("작은 글씨도 읽어야 합니다", MYEONGJO, 20),
    ]
    # same size as english_sizes: the two share one batched detector pass
    return _page((560, 320), lines, margin=16), [t for t, _, _ in lines]


def rotated_line() -> tuple[Image.Image, list[str]]:
    text = "Rotated line of text"
    line = Image.new("L", (370, 50), 255)
    ImageDraw.Draw(line).text((8, 6), text, font=_font(SANS, 30), fill=0)
    line = line.rotate(20, expand=True, fillcolor=255, resample=Image.BICUBIC)
    # different size from english_sign but the same 480x256 detector canvas: batched together
    image = Image.new("RGB", (470, 250), (255, 255, 255))
    image.paste(line.convert("RGB"), (40, 20))
    return image, [text]


def wide_banner() -> tuple[Image.Image, list[str]]:
    text = "GRAND OPENING SALE - EVERYTHING MUST GO - 50% OFF ALL ITEMS THIS WEEKEND ONLY - 대박 세일"
    image = Image.new("RGB", (1800, 64), (250, 220, 60))
    ImageDraw.Draw(image).text((16, 14), text, font=_font(GOTHIC, 32), fill=(20, 20, 120))
    return image, [text]


def tiny() -> tuple[Image.Image, list[str]]:
    image = Image.new("RGB", (48, 20), (255, 255, 255))
    ImageDraw.Draw(image).text((2, 2), "OK", font=_font(SANS_BOLD, 14), fill=(0, 0, 0))
    return image, ["OK"]


def no_text() -> tuple[Image.Image, list[str]]:
    # photo-like: smooth sky/ground gradient, a few soft blobs and sensor noise; no glyphs at all
    rng = np.random.default_rng(7)
    h, w = 240, 320
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    sky = np.stack([120 + 80 * y / h, 160 + 60 * y / h, 230 - 40 * y / h], axis=-1)
    ground = np.stack([70 + 30 * x / w, 110 + 20 * x / w, 50 + 0 * x], axis=-1)
    image = np.where((y > h * 0.6)[..., None], ground, sky)
    blobs = ((80, 165, 35, (40, 90, 40)), (240, 155, 45, (60, 110, 50)), (265, 40, 20, (250, 240, 200)))
    for cx, cy, r, colour in blobs:
        mask = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r**2))[..., None]
        image = image * (1 - mask) + np.array(colour, np.float32) * mask
    image += rng.normal(0, 6, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)), []


# name -> (renderer, file suffix, language of the text: "en" images are scored for accuracy)
IMAGES = {
    "ocr_en_sizes": (english_sizes, "png", "en"),
    "ocr_en_sign": (english_sign, "jpg", "en"),
    "ocr_ko_mixed": (korean_mixed, "png", "ko"),
    "ocr_en_rotated": (rotated_line, "png", "en"),
    "ocr_banner_wide": (wide_banner, "png", "ko"),
    "ocr_tiny": (tiny, "png", "en"),
    "ocr_notext": (no_text, "jpg", "none"),
}


def main() -> None:
    truth = {}
    for name, (render, suffix, lang) in IMAGES.items():
        image, lines = render()
        path = HERE / f"{name}.{suffix}"
        if suffix == "jpg":
            image.save(path, quality=85)
        else:
            image.save(path, optimize=True)
        truth[path.name] = {"lang": lang, "lines": lines}
        print(f"{path.name}: {image.size[0]}x{image.size[1]}, {path.stat().st_size} bytes")
    (HERE / "ocr_truth.json").write_text(json.dumps(truth, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
