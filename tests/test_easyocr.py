"""`easyocr` over the real server: parity with Reader.readtext, batching across requests, bad input."""
from __future__ import annotations

import io
import json
import wave
from pathlib import Path

import cv2
import numpy as np
import pytest

from trident import InvalidInputError
from trident_serving.ocr import load_reader

pytestmark = pytest.mark.easyocr
DATA = Path(__file__).resolve().parent / "data"
IMAGES = sorted(json.loads((DATA / "ocr_truth.json").read_text(encoding="utf-8")))


@pytest.fixture(scope="session")
def reader(triton):
    """A stock easyocr.Reader on the very weights the server loaded."""
    return load_reader(triton.repository / "easyocr" / "1" / "weights", "cpu")


@pytest.fixture(scope="session")
def expected(reader) -> dict[str, list]:
    """readtext(path) with default arguments, for every committed test image."""
    return {name: reader.readtext(str(DATA / name)) for name in IMAGES}


def assert_same_lines(served, reference) -> None:
    assert [line.text for line in served] == [text for _, text, _ in reference]
    if reference:
        np.testing.assert_allclose(np.array([line.box for line in served]),
                                   np.array([box for box, _, _ in reference], dtype=np.float32), atol=1.0)
        np.testing.assert_allclose([line.score for line in served], [score for _, _, score in reference], atol=1e-3)


def test_parity_is_not_vacuous(expected):
    lines = [line for name in IMAGES for line in expected[name]]
    assert len(lines) >= 20, "synthetic weights should find dozens of text boxes"
    assert sum(bool(text) for _, text, _ in lines) >= 10, "and read non-empty text in them"


@pytest.mark.parametrize("name", IMAGES)
def test_read_text_matches_readtext(client, expected, name):
    assert_same_lines(client.read_text(DATA / name), expected[name])


def test_concurrent_requests_are_batched_and_unchanged(triton, expected):
    client = triton.client("grpc")
    names = (IMAGES * 5)[:32]
    before = triton.metrics()
    results = triton.batched("easyocr", lambda: client.read_text_many([DATA / name for name in names],
                                                                       concurrency=len(names)))
    after = triton.metrics()
    for name, served in zip(names, results):
        assert_same_lines(served, expected[name])
    inferences = after[("nv_inference_count", "easyocr")] - before.get(("nv_inference_count", "easyocr"), 0)
    executions = after[("nv_inference_exec_count", "easyocr")] - before.get(("nv_inference_exec_count", "easyocr"), 0)
    assert inferences == 32 and executions < inferences


def _wav() -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1), out.setsampwidth(2), out.setframerate(16000)
        out.writeframes(np.zeros(1600, np.int16).tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize("payload, message", [
    (lambda: b"", "empty"),
    (lambda: (DATA / "ocr_ko_mixed.png").read_bytes()[:3000], "truncated PNG"),
    (_wav, "could not be decoded"),
    (lambda: cv2.imencode(".png", np.zeros((12000, 12000), np.uint8))[1].tobytes(), "above the limit"),
])
def test_bad_images_get_clear_errors(client, triton, payload, message):
    with pytest.raises(InvalidInputError, match=message):
        client.read_text(payload())
    assert triton.is_ready()


def test_one_pixel_image(client, reader, tmp_path):
    path = tmp_path / "one.png"
    path.write_bytes(cv2.imencode(".png", np.full((1, 1, 3), 255, np.uint8))[1].tobytes())
    assert_same_lines(client.read_text(path), reader.readtext(str(path)))
