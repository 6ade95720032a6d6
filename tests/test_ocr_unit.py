"""EasyOCR without a server: batched reading equals Reader.readtext, real English accuracy, bad inputs."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import cv2
import easyocr_en_models
import numpy as np
import pytest
from real_speech import edit_distance

from export.easyocr import write_weights
from trident_serving.errors import InvalidInput
from trident_serving.images import decode_image
from trident_serving.ocr import DEFAULTS, BatchOptions, Line, decode_page, load_reader, read_batch

pytestmark = pytest.mark.easyocr
DATA = Path(__file__).resolve().parent / "data"
TRUTH = json.loads((DATA / "ocr_truth.json").read_text(encoding="utf-8"))
# small batches on purpose: several recogniser chunks per width, still identical results
SMALL = BatchOptions(detect_pixels=600_000, recognise_pixels=64 * 256 * 4)


@pytest.fixture(scope="module")
def images() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(RGB, grey) pages of the committed images, as the served model decodes them."""
    return {name: decode_page((DATA / name).read_bytes(), name) for name in sorted(TRUTH)}


@pytest.fixture(scope="module")
def synthetic_weights(tmp_path_factory) -> Path:
    return write_weights(tmp_path_factory.mktemp("easyocr") / "weights", ("ko", "en"), "synthetic", seed=0)


@pytest.fixture(scope="module")
def english_reader(tmp_path_factory):
    weights = write_weights(tmp_path_factory.mktemp("easyocr_en") / "weights", ("en",),
                            easyocr_en_models.model_dir())
    return load_reader(weights)


def assert_same(expected: list, got: list[Line], name: str) -> None:
    """readtext's (box, text, score) list against read_batch's Lines: same order and texts, boxes and scores close."""
    assert [t for _, t, _ in expected] == [line.text for line in got], name
    for (box, _, score), line in zip(expected, got):
        assert np.abs(np.asarray(box, dtype=np.float32) - line.box).max() <= 1.0, name
        assert abs(score - line.score) <= 1e-3, name


def test_batched_equals_readtext_synthetic_ko_en(synthetic_weights, images):
    reader = load_reader(synthetic_weights)
    got = read_batch(reader, list(images.values()))
    lines = [line for per_image in got for line in per_image]
    # non-vacuous: many boxes incl. rotated (free) ones, non-empty texts, and both of get_text's passes taken
    assert len(lines) >= 20
    assert sum(bool(line.text) for line in lines) >= 20
    assert any(not np.allclose(line.box[0, 1], line.box[1, 1]) for line in lines)
    assert any(line.score < DEFAULTS["contrast_ths"] for line in lines)
    assert any(line.score >= DEFAULTS["contrast_ths"] for line in lines)
    for name, per_image in zip(images, got):
        assert_same(reader.readtext(str(DATA / name)), per_image, name)


@pytest.fixture(scope="module")
def english_batch(english_reader, images) -> dict[str, list[Line]]:
    """read_batch with the real English weights over the English images and the one without text."""
    names = [n for n in images if TRUTH[n]["lang"] in ("en", "none")]
    return dict(zip(names, read_batch(english_reader, [images[n] for n in names], SMALL)))


def test_batched_equals_readtext_real_english(english_reader, english_batch, images):
    assert sum(len(lines) for lines in english_batch.values()) >= 10
    for name, lines in english_batch.items():
        assert_same(english_reader.readtext(str(DATA / name)), lines, name)


def test_english_character_error_rate(english_batch):
    english = {name: lines for name, lines in english_batch.items() if TRUTH[name]["lang"] == "en"}
    errors = length = 0
    for name, lines in english.items():
        truth = " ".join(TRUTH[name]["lines"])
        read = " ".join(" ".join(line.text for line in reading_order(lines)).split())
        errors += edit_distance(read, truth)
        length += len(truth)
    cer = errors / length
    print(f"English CER over {len(english)} images: {cer:.4f} ({errors}/{length})")
    assert cer <= 0.05


def test_no_text_and_empty_batch(english_reader, english_batch):
    assert english_batch["ocr_notext.jpg"] == []
    assert read_batch(english_reader, []) == []


def test_grayscale_png_reads_like_colour(english_reader, english_batch, images):
    grey = images["ocr_en_sign.jpg"][1]
    page = decode_page(cv2.imencode(".png", grey)[1].tobytes())
    assert page[0].shape == grey.shape + (3,)
    read = read_batch(english_reader, [page])[0]
    assert [line.text for line in read] == [line.text for line in english_batch["ocr_en_sign.jpg"]]


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"definitely not an image", "could not be decoded"),
    ((DATA / "ocr_en_sizes.png").read_bytes()[:2000], "truncated PNG"),
    ((DATA / "ocr_en_sign.jpg").read_bytes()[:3000], "truncated JPEG"),
])
def test_bad_image_bytes_are_rejected(data, message):
    with pytest.raises(InvalidInput, match=message) as info:
        decode_image(data, "IMAGE")
    assert "IMAGE" in str(info.value)


def test_tampered_weights_fail_md5_at_load(synthetic_weights, tmp_path):
    copy = shutil.copytree(synthetic_weights, tmp_path / "weights")
    manifest = json.loads((copy / "manifest.json").read_text())
    recogniser = next(name for name in manifest["md5"] if name != "craft_mlt_25k.pth")
    with open(copy / recogniser, "ab") as f:
        f.write(b"\0")
    with pytest.raises(FileNotFoundError, match="MD5 mismatch"):
        load_reader(copy)


def reading_order(lines: list[Line]) -> list[Line]:
    """Lines sorted along the page's dominant text direction: line by line, then along each line."""
    if not lines:
        return []
    boxes = np.array([line.box for line in lines])
    top = boxes[:, 1] - boxes[:, 0]
    angle = float(np.median(np.arctan2(top[:, 1], top[:, 0])))
    along_dir, across_dir = np.array([math.cos(angle), math.sin(angle)]), np.array([-math.sin(angle), math.cos(angle)])
    centres = boxes.mean(axis=1)
    along, across = centres @ along_dir, centres @ across_dir
    height = float(np.median(np.linalg.norm(boxes[:, 3] - boxes[:, 0], axis=1)))
    rows: list[list[int]] = []
    for i in np.argsort(across):
        if rows and across[i] - across[rows[-1][0]] < height / 2:
            rows[-1].append(i)
        else:
            rows.append([i])
    return [lines[i] for row in rows for i in sorted(row, key=lambda i: along[i])]
