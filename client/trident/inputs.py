"""Conversion of user inputs (paths, bytes, PIL images, arrays) to the encoded bytes the models take."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np

if TYPE_CHECKING:
    import PIL.Image

ImageLike = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, "PIL.Image.Image"]


def read_bytes(value: str | os.PathLike | bytes | bytearray | memoryview) -> bytes:
    """Bytes as given, or the contents of the file at a path."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return Path(value).read_bytes()


def encode_image(image: ImageLike) -> bytes:
    """Encoded image bytes for the server.

    Paths and bytes are sent untouched (the server decodes them exactly as ultralytics/EasyOCR decode files).
    A PIL image is sent as lossless PNG. A numpy array is taken as OpenCV/ultralytics do: HxWx3 **BGR**
    (or HxW grayscale) uint8, and sent as lossless PNG.
    """
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise ValueError(f"image array must be HxW or HxWx3/4 uint8 (BGR), got {image.dtype} {image.shape}")
        rgb = image if image.ndim == 2 else image[..., [2, 1, 0, 3][: image.shape[2]]]
        image = Image.fromarray(np.ascontiguousarray(rgb))
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    return read_bytes(image)
