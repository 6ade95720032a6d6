"""Decoding of encoded images (JPEG/PNG/BMP/WebP/...) sent as bytes."""
from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image

from .errors import InvalidInput

# 100 MP: a 10000x10000 photo fits, a decompression bomb does not.
MAX_PIXELS = 100_000_000


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) read from the header without decoding, or None if Pillow does not know the format."""
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # our own limit applies, not Pillow's
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:  # noqa: BLE001 - any failure means "not an image Pillow knows"
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def decode_image(data: bytes, name: str = "IMAGE", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes to an HxWx3 uint8 BGR array, exactly as `cv2.imread(path)` would.

    Grayscale is expanded to three channels and alpha is dropped (cv2.IMREAD_COLOR), which is what
    ultralytics and EasyOCR do with a file. Raises InvalidInput naming `name` for anything that is
    not a decodable image of a sane size.
    """
    if not data:
        raise InvalidInput(f"{name} is empty: send the encoded bytes of a JPEG, PNG, BMP or WebP image")
    size = image_size(data)
    if size is not None and size[0] * size[1] > max_pixels:
        raise InvalidInput(
            f"{name} is {size[0]}x{size[1]} pixels, above the limit of {max_pixels:,} pixels; downscale it first"
        )
    _check_complete(data, name)
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        head = data[:8]
        raise InvalidInput(
            f"{name} could not be decoded as an image ({len(data)} bytes starting {head!r}): "
            "it is not a JPEG/PNG/BMP/WebP file, or it is truncated or corrupt"
        )
    if image.shape[0] * image.shape[1] > max_pixels:
        raise InvalidInput(f"{name} is {image.shape[1]}x{image.shape[0]} pixels, above the limit of {max_pixels:,}")
    return image


def _check_complete(data: bytes, name: str) -> None:
    """Reject truncated JPEG/PNG/WebP files, which OpenCV would silently decode with a grey tail."""
    if data[:3] == b"\xff\xd8\xff":
        complete, kind = b"\xff\xd9" in data[-1024:], "JPEG"  # EOI marker (tolerates trailing bytes)
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        complete, kind = b"IEND" in data[-64:], "PNG"
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        complete, kind = len(data) >= int.from_bytes(data[4:8], "little") + 8, "WebP"
    else:
        return
    if not complete:
        raise InvalidInput(f"{name} is a truncated {kind} file ({len(data)} bytes): its end marker is missing")
