"""Decoding of encoded images (JPEG, PNG, BMP, WebP) sent as bytes, safe against hostile files.

Before any decoder runs, `read_header` identifies the format by its magic bytes (anything but the four
documented formats is refused: OpenCV would also decode Radiance HDR, PFM, PPM, Sun raster, TIFF, JPEG 2000...,
whose decoders allocate the whole canvas up front) and reads the dimensions from the file's own header, so an
image above the pixel limit is refused without allocating a pixel. OpenCV's own limit
(`OPENCV_IO_MAX_IMAGE_PIXELS`, read once when cv2 is first imported) is set to the same value as a second line
of defence: the launcher and the container set it in the environment, and this module sets it when it is the
first to import cv2.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .errors import InvalidInput

# 100 MP: a 10000x10000 photo fits, a decompression bomb does not.
MAX_PIXELS = 100_000_000
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_PIXELS))

import cv2  # noqa: E402 - after the pixel limit is in the environment
import numpy as np  # noqa: E402

# Each side at least 1/1000 of the other: no photo or scan is thinner, and EasyOCR's resize to its 2560 px
# canvas would collapse a thinner image to zero rows.
MAX_ASPECT = 1000
FORMATS = "JPEG, PNG, BMP or WebP"

# JPEG start-of-frame markers (baseline, extended, progressive, lossless; Huffman and arithmetic coded).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# In entropy-coded data 0xFF is followed by 0x00 (stuffing), a restart marker or fill 0xFF; anything else is
# the next marker segment.
_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


@dataclass(frozen=True)
class Header:
    """What an image file's header says, read without decoding."""

    format: str  # "JPEG", "PNG", "BMP" or "WebP"
    width: int
    height: int


def read_header(data: bytes, name: str = "IMAGE") -> Header:
    """Format (by magic bytes) and dimensions (from the header) of an encoded image; InvalidInput naming `name`
    for any other format, and for a JPEG or PNG file whose structure ends before its end marker (truncated)."""
    if data[:3] == b"\xff\xd8\xff":
        return _jpeg(data, name)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return _png(data, name)
    if data[:2] == b"BM":
        return _bmp(data, name)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp(data, name)
    raise InvalidInput(f"{name} could not be decoded as an image ({_describe(data)}): "
                       f"it is not a {FORMATS} file")


def decode_image(data: bytes, name: str = "IMAGE", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes to an HxWx3 uint8 BGR array, exactly as `cv2.imread(path)` would.

    Grayscale is expanded to three channels, alpha is dropped and a JPEG's EXIF orientation is applied
    (cv2.IMREAD_COLOR), which is what ultralytics does with a file. Raises InvalidInput naming `name` for
    anything that is not a complete JPEG/PNG/BMP/WebP image of a sane size.
    """
    if not data:
        raise InvalidInput(f"{name} is empty: send the encoded bytes of a {FORMATS} image")
    header = read_header(data, name)
    width, height = header.width, header.height
    if width <= 0 or height <= 0:
        raise InvalidInput(f"{name} is a {header.format} file whose header says {width}x{height} pixels")
    if width * height > max_pixels:
        raise InvalidInput(f"{name} is {width}x{height} pixels, above the limit of {max_pixels:,} pixels; "
                           "downscale it first")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise InvalidInput(f"{name} is {width}x{height} pixels: one side is more than {MAX_ASPECT} times the "
                           "other, which no model here can read")
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:  # OpenCV's own size limit, or a decoder assertion
        image = None
    if image is None:
        raise InvalidInput(f"{name} could not be decoded as a {header.format} image ({_describe(data)}): "
                           "it is truncated or corrupt")
    return image


def _jpeg(data: bytes, name: str) -> Header:
    """Walk the marker segments (skipping APPn, so an EXIF thumbnail's markers are never seen) to the frame
    header, then through the scans to the end-of-image marker. Data after that marker is ignored, as libjpeg
    ignores it: phones append the video of a "motion photo" there."""
    size, pos = None, 2
    while pos + 2 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            if size is None:
                raise InvalidInput(f"{name} is a JPEG file without a frame header ({_describe(data)})")
            return Header("JPEG", *size)
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # standalone markers
            pos += 2
            continue
        if pos + 4 > len(data):
            break
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _SOF and size is None and end <= len(data) and end - pos >= 9:
            size = (int.from_bytes(data[pos + 7:pos + 9], "big"), int.from_bytes(data[pos + 5:pos + 7], "big"))
        if marker == 0xDA:  # start of scan: entropy-coded data runs to the next real marker
            if size is None:
                raise InvalidInput(f"{name} is a JPEG file whose scan comes before its frame header")
            found = _MARKER.search(data, end)
            if found is None:
                break
            end = found.start()
        pos = end
    raise InvalidInput(f"{name} is a truncated JPEG file ({len(data)} bytes): its end marker is missing")


def _png(data: bytes, name: str) -> Header:
    """IHDR gives the size; the chunk chain must reach IEND (anything after it is ignored)."""
    if data[12:16] != b"IHDR" or len(data) < 24:
        raise InvalidInput(f"{name} is a PNG file without its IHDR header ({_describe(data)})")
    header = Header("PNG", int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"))
    pos = 8
    while pos + 8 <= len(data):
        if data[pos + 4:pos + 8] == b"IEND":
            return header
        pos += 12 + int.from_bytes(data[pos:pos + 4], "big")  # length, type, data, CRC
    raise InvalidInput(f"{name} is a truncated PNG file ({len(data)} bytes): its end marker is missing")


def _bmp(data: bytes, name: str) -> Header:
    """BITMAPCOREHEADER (OS/2: 16-bit sizes) or BITMAPINFOHEADER and its successors (signed 32-bit; a negative
    height means top-down rows). OpenCV refuses a BMP whose pixel data is cut short, so no end check."""
    dib = int.from_bytes(data[14:18], "little")
    if dib == 12 and len(data) >= 22:
        return Header("BMP", int.from_bytes(data[18:20], "little"), int.from_bytes(data[20:22], "little"))
    if dib >= 40 and len(data) >= 26:
        width = int.from_bytes(data[18:22], "little", signed=True)
        return Header("BMP", width, abs(int.from_bytes(data[22:26], "little", signed=True)))
    raise InvalidInput(f"{name} is a BMP file with an unknown header ({_describe(data)})")


def _webp(data: bytes, name: str) -> Header:
    """Size from the first chunk: VP8X (extended: canvas size), VP8L (lossless) or VP8 (lossy key frame)."""
    if len(data) < int.from_bytes(data[4:8], "little") + 8:
        raise InvalidInput(f"{name} is a truncated WebP file ({len(data)} bytes): shorter than its RIFF size")
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return Header("WebP", int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1)
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return Header("WebP", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return Header("WebP", int.from_bytes(data[26:28], "little") & 0x3FFF,
                      int.from_bytes(data[28:30], "little") & 0x3FFF)
    raise InvalidInput(f"{name} is a WebP file with an unknown or damaged header ({_describe(data)})")


def _describe(data: bytes) -> str:
    return f"{len(data)} bytes starting {data[:8]!r}"
