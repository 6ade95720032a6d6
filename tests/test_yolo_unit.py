"""YOLO pre/post-processing, image decoding and config rendering, without a server."""
from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from ultralytics.utils import ASSETS

from export.repository import set_parameter
from export.yolo import yolov8_config
from trident.inputs import encode_image
from trident_serving import yolo
from trident_serving.errors import InvalidInput
from trident_serving.images import decode_image

pytestmark = pytest.mark.yolo


def built_predictor(**options):
    """ultralytics' DetectionPredictor of a PyTorch YOLOv8n, set up as `predict(**options)` uses it."""
    from ultralytics import YOLO

    model = YOLO("yolov8n.yaml", task="detect")
    model.predict(np.zeros((64, 64, 3), np.uint8), verbose=False, **options)  # builds model.predictor
    return model.predictor


@pytest.fixture(scope="module")
def predictor():
    """Set up for a fixed-640 model, as `predict(rect=False)` uses it."""
    return built_predictor(rect=False)


def test_decode_matches_cv2_imread():
    path = ASSETS / "zidane.jpg"
    np.testing.assert_array_equal(decode_image(path.read_bytes()), cv2.imread(str(path)))


def test_decode_drops_alpha_and_expands_gray():
    rgba = np.random.default_rng(0).integers(0, 255, (20, 30, 4), dtype=np.uint8)
    decoded = decode_image(cv2.imencode(".png", rgba)[1].tobytes())
    np.testing.assert_array_equal(decoded, rgba[..., :3])
    gray = decode_image(cv2.imencode(".png", rgba[..., 0])[1].tobytes())
    assert gray.shape == (20, 30, 3)


@pytest.mark.parametrize("data, message", [(b"", "empty"), (b"GIF89a" + b"\0" * 20, "could not be decoded"),
                                           (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "PNG file without its IHDR header")])
def test_decode_errors(data, message):
    with pytest.raises(InvalidInput, match=message):
        decode_image(data)


def test_letterbox_and_tensor_match_ultralytics_preprocess(predictor):
    image = cv2.imread(str(ASSETS / "bus.jpg"))
    ours = yolo.to_model_input([yolo.letterbox(image, mode="square")], torch.device("cpu"))
    theirs = predictor.preprocess([image])
    assert ours.shape == theirs.shape == (1, 3, 640, 640)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("size, letterboxed", [((810, 1080), (640, 480)), ((1280, 720), (384, 640)),
                                                ((1999, 301), (96, 640)), ((400, 1100), (640, 256)),
                                                ((500, 500), (640, 640)), ((1, 1), (640, 640)), ((3000, 5), (32, 640))])
def test_rect_letterbox_and_tensor_match_predict_defaults(size, letterboxed):
    """Rect letterboxing is `predict()`'s default preprocessing, for every aspect ratio: the minimal padding to
    multiples of 32 (the height and width below); the smallest side is one stride (export.yolo.MIN_SIDE)."""
    predictor = built_predictor()  # predict() with defaults (rect=True)
    image = cv2.resize(cv2.imread(str(ASSETS / "bus.jpg")), size)
    ours = yolo.to_model_input([yolo.letterbox(image, mode="rect")], torch.device("cpu"))
    theirs = predictor.preprocess([image])
    assert ours.shape == theirs.shape == (1, 3, *letterboxed)
    torch.testing.assert_close(ours, theirs)


def test_shape_groups_keep_order_within_and_between_groups():
    images = [np.zeros(shape, np.uint8) for shape in [(640, 480, 3), (384, 640, 3), (640, 480, 3), (96, 640, 3),
                                                      (384, 640, 3)]]
    assert yolo.shape_groups(images) == [[0, 2], [1, 4], [3]]
    assert yolo.shape_groups(images[:1]) == [[0]] and yolo.shape_groups([]) == []


def test_postprocess_matches_ultralytics(predictor):
    torch.manual_seed(0)
    prediction = torch.rand(2, 84, 8400) * torch.tensor([640, 640, 80, 80] + [0.6] * 80)[:, None]
    shapes = [(1080, 810), (333, 517)]
    ours = yolo.postprocess(prediction, (640, 640), shapes, [0.5, 0.5], [0.7, 0.7])
    predictor.args.conf, predictor.args.iou = 0.5, 0.7
    originals = [np.zeros((*hw, 3), np.uint8) for hw in shapes]
    theirs = predictor.postprocess(prediction, torch.zeros(2, 3, 640, 640), originals)
    for mine, ref in zip(ours, theirs):
        assert len(mine.boxes) > 10
        np.testing.assert_allclose(mine.boxes, ref.boxes.xyxy.numpy(), atol=1e-4)
        np.testing.assert_array_equal(mine.classes, ref.boxes.cls.numpy().astype(np.int32))


def test_postprocess_uses_torchvision_nms_in_a_fresh_process():
    """A stub imports only what `detect` imports: ultralytics must still get torchvision's NMS kernel there.

    Without it ultralytics falls back to a per-box Python loop (56 ms per image with random weights' 800
    candidates on this CPU, and one GPU sync per kept box on CUDA)."""
    code = (
        "import torch\n"
        "from trident_serving import yolo\n"
        "import ultralytics.utils.nms as nms\n"
        "calls = []\n"
        "slow = nms.TorchNMS.nms\n"
        "nms.TorchNMS.nms = staticmethod(lambda *a: calls.append(1) or slow(*a))\n"
        "torch.manual_seed(0)\n"
        "p = torch.rand(1, 84, 8400) * torch.tensor([640, 640, 80, 80] + [0.6] * 80)[:, None]\n"
        "found = yolo.postprocess(p, (640, 640), [(480, 640)], [0.5], [0.7])[0]\n"
        "assert len(found.boxes) > 10 and not calls, (len(found.boxes), len(calls))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("value", [-0.01, 1.5, float("nan"), float("inf")])
def test_threshold_checks(value):
    with pytest.raises(InvalidInput, match="CONF"):
        yolo.check_threshold(value, "CONF_THRESHOLD")


def test_client_encodes_bgr_arrays_losslessly():
    bgr = np.random.default_rng(1).integers(0, 255, (7, 9, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(encode_image(bgr)), bgr)
    with pytest.raises(ValueError, match="uint8"):
        encode_image(bgr.astype(np.float32))


@pytest.mark.parametrize("flavour, kind, expected", [
    ("onnxruntime", "gpu", 'backend: "onnxruntime"'), ("tensorrt", "gpu", 'platform: "tensorrt_plan"'),
    ("python", "cpu", 'backend: "python"')])
def test_yolov8_config_flavours(flavour, kind, expected):
    text = yolov8_config(flavour, kind, 64, {"names": {i: str(i) for i in range(80)}, "dynamic": False})
    assert expected in text and "dynamic_batching" in text and f"KIND_{kind.upper()}" in text
    assert "dims: [ 3, 640, 640 ]" in text and "dims: [ 84, 8400 ]" in text
    assert ("gpu_execution_accelerator" in text) == (flavour == "onnxruntime")
    dynamic = yolov8_config(flavour, kind, 64, {"names": {i: str(i) for i in range(80)}, "dynamic": True})
    assert "dims: [ 3, -1, -1 ]" in dynamic and "dims: [ 84, -1 ]" in dynamic  # rect letterbox: any multiple of 32


def test_set_parameter_replaces_json_values(tmp_path):
    config = tmp_path / "config.pbtxt"
    config.write_text('name: "m"\n')
    set_parameter(config, "metadata", json.dumps({"a": 'x"}'}))
    set_parameter(config, "metadata", json.dumps({"b": "\\n}"}))
    text = config.read_text()
    assert text.count("parameters") == 1 and '\\"b\\"' in text
