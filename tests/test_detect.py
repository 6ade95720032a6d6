"""`detect` and `yolov8` over the real server: parity with ultralytics, batching, bad input."""
from __future__ import annotations

import functools
import json
import threading

import cv2
import numpy as np
import pytest
from ultralytics.utils import ASSETS

from trident import InvalidInputError
from trident import stats

from conftest import detect_changed, detect_gathering, gathering

pytestmark = pytest.mark.yolo
CONF = 0.05  # synthetic weights: dozens of boxes per image at this threshold (asserted below)


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict:
    """ultralytics' bundled samples plus generated edge cases, as files."""
    folder = tmp_path_factory.mktemp("images")
    bus = cv2.imread(str(ASSETS / "bus.jpg"))
    zidane = cv2.imread(str(ASSETS / "zidane.jpg"))
    cases = {
        "bus.jpg": (ASSETS / "bus.jpg").read_bytes(),
        "zidane.jpg": (ASSETS / "zidane.jpg").read_bytes(),
        "odd_333x517.png": cv2.imencode(".png", cv2.resize(bus, (333, 517)))[1].tobytes(),
        "wide_1999x301.jpg": cv2.imencode(".jpg", cv2.resize(zidane, (1999, 301)))[1].tobytes(),
        "portrait_400x1100.jpg": cv2.imencode(".jpg", cv2.resize(bus, (400, 1100)))[1].tobytes(),
        "square_500x500.png": cv2.imencode(".png", cv2.resize(bus, (500, 500)))[1].tobytes(),
        "gray.png": cv2.imencode(".png", cv2.cvtColor(bus, cv2.COLOR_BGR2GRAY))[1].tobytes(),
        "alpha.png": cv2.imencode(".png", np.dstack([zidane, np.linspace(0, 255, zidane.shape[1], dtype=np.uint8)[None]
                                                     .repeat(zidane.shape[0], 0)]))[1].tobytes(),
        "bus.webp": cv2.imencode(".webp", bus)[1].tobytes(),
        "bus.bmp": cv2.imencode(".bmp", bus)[1].tobytes(),
    }
    paths = {}
    for name, data in cases.items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
    return paths


@pytest.fixture(scope="session")
def reference(triton):
    """ultralytics' own predictor on the same synthetic .pt the repository was exported from."""
    from ultralytics import YOLO

    manifest = json.loads((triton.repository / "export.json").read_text())
    return YOLO(manifest["yolov8"]["weights"], task="detect")


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of corresponding xyxy boxes."""
    inter = np.clip(np.minimum(a[:, 2:], b[:, 2:]) - np.maximum(a[:, :2], b[:, :2]), 0, None).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).prod(-1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def arrays(result) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes, classes, scores) of our DetectResult or of an ultralytics Results."""
    if hasattr(result, "class_ids"):
        return result.boxes, result.class_ids, result.scores
    return result.boxes.xyxy.numpy(), result.boxes.cls.numpy().astype(int), result.boxes.conf.numpy()


def assert_same_detections(served, expected) -> None:
    """Same count; served and reference boxes pair up one to one with the same class, score within 1e-3 and
    IoU >= 0.99 (boxes clipped to a line at the image border have no area: there, corners within 0.5 px)."""
    from scipy.optimize import linear_sum_assignment

    boxes, classes, scores = arrays(expected)
    served_boxes, served_classes, served_scores = arrays(served)
    assert len(served_boxes) == len(boxes)
    # Pairing by distance, not by rank: near-equal scores may be ordered differently.
    cost = np.abs(served_boxes[:, None] - boxes[None]).max(-1) + 100 * np.abs(served_scores[:, None] - scores[None])
    cost += 1e6 * (served_classes[:, None] != classes[None])
    rows, cols = linear_sum_assignment(cost)
    np.testing.assert_array_equal(served_classes[rows], classes[cols])
    np.testing.assert_allclose(served_scores[rows], scores[cols], atol=1e-3)
    a, b = served_boxes[rows], boxes[cols]
    has_area = ((b[:, 2:] - b[:, :2]) > 1).all(1)
    assert (box_iou(a[has_area], b[has_area]) >= 0.99).all()
    np.testing.assert_allclose(a[~has_area], b[~has_area], atol=0.5)


# letterboxed rect (predict()'s default) to: 640x480, 384x640, 640x416, 96x640, 640x256, 640x640, 640x480, ...
SHAPES = ["bus.jpg", "zidane.jpg", "odd_333x517.png", "wide_1999x301.jpg", "portrait_400x1100.jpg",
          "square_500x500.png"]


@pytest.mark.parametrize("name", SHAPES + ["gray.png", "alpha.png", "bus.webp", "bus.bmp"])
def test_detect_matches_ultralytics_predict(client, images, reference, name):
    """`detect` letterboxes rect as `predict()` does with its defaults: the same detections."""
    served = client.detect(images[name], conf=CONF)
    expected = reference.predict(str(images[name]), conf=CONF, verbose=False)[0]
    assert len(served) >= 24, "too few boxes for a meaningful comparison"
    assert_same_detections(served, expected)
    assert served.detections[0].label == reference.names[served.detections[0].class_id]


def test_square_letterbox_matches_predict_without_rect(triton, images, reference):
    """detect's `letterbox: square` (for static engines) pads every image to 640x640, as `predict(rect=False)`
    does: six images of six rect shapes, gathered into one execution of `detect`, are one call to `yolov8`."""
    def square(exported: dict) -> dict:
        return {**gathering(exported, len(SHAPES), seconds=30),
                "parameters": {**exported["parameters"], "letterbox": {"string_value": "square"}}}

    with detect_changed(triton, square):
        before = triton.batch_executions("yolov8")
        served = triton.client("grpc").detect_many([images[name] for name in SHAPES], conf=CONF,
                                                   concurrency=len(SHAPES))
        assert triton.executions_since("yolov8", before, len(SHAPES)) == {len(SHAPES): 1}
    for name, result in zip(SHAPES, served):
        expected = reference.predict(str(images[name]), conf=CONF, rect=False, verbose=False)[0]
        assert len(result) >= 24
        assert_same_detections(result, expected)


def test_default_thresholds_are_ultralytics_defaults(client, images, reference):
    served = client.detect(images["bus.jpg"])  # conf 0.25, iou 0.7
    expected = reference.predict(str(images["bus.jpg"]), verbose=False)[0]
    assert len(served) > 0
    assert_same_detections(served, expected)


def test_array_and_pil_inputs_match_path(client, images):
    from PIL import Image

    by_path = client.detect(images["bus.jpg"], conf=CONF)
    bgr = cv2.imread(str(images["bus.jpg"]))
    by_array = client.detect(bgr, conf=CONF)
    by_pil = client.detect(Image.fromarray(bgr[..., ::-1]), conf=CONF)
    np.testing.assert_allclose(by_array.boxes, by_path.boxes, atol=1e-3)
    np.testing.assert_allclose(by_pil.boxes, by_path.boxes, atol=1e-3)


def test_yolov8_batch_split_and_concat_through_the_python_flavour(client, triton, images):
    """A batch of two images through the python flavour of `yolov8` (the only one this CPU server runs:
    onnxruntime inside a Python model, which concatenates the requests of an execution along the batch axis and
    splits the output back) equals onnxruntime's own run of `model.onnx`, image by image and in order. Both
    sides are onnxruntime: this checks the flavour's batch plumbing, not a backend. The native onnxruntime and
    TensorRT backends are only config-checked here, until a GPU host runs them."""
    import onnxruntime

    from trident_serving import yolo
    from trident_serving.images import decode_image

    letterboxed = [yolo.letterbox(decode_image(images[n].read_bytes()), mode="rect") for n in ("bus.jpg", "gray.png")]
    batch = yolo.to_model_input(letterboxed, "cpu").numpy()
    served = client.infer("yolov8", {"images": batch}, ["output0"])["output0"]
    session = onnxruntime.InferenceSession(str(triton.repository / "yolov8" / "1" / "model.onnx"))
    expected = session.run(["output0"], {"images": batch})[0]
    assert batch.shape == (2, 3, 640, 480) and served.shape == (2, 84, 80 * 60 + 40 * 30 + 20 * 15)
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_ultralytics_triton_client(triton, images, scheme):
    """`YOLO("<scheme>://host:port/yolov8")` — ultralytics' own Triton client — works against our server, and
    letterboxes rect as its local predict() does (the config's metadata says `dynamic`)."""
    from ultralytics import YOLO

    url = triton.http_url if scheme == "http" else triton.grpc_url
    remote = YOLO(f"{scheme}://{url}/yolov8", task="detect")
    local = YOLO(str(triton.repository / "yolov8" / "1" / "model.onnx"), task="detect")
    served = remote.predict(str(images["bus.jpg"]), conf=CONF, verbose=False)[0]
    expected = local.predict(str(images["bus.jpg"]), conf=CONF, verbose=False)[0]
    assert len(served.boxes) >= 24
    assert served.names == expected.names
    assert_same_detections(served, expected)


def test_concurrent_requests_are_batched(triton, images, reference):
    """Eight concurrent requests, gathered into one execution of `detect` (detect_gathering), reach `yolov8` as
    one BLS call per letterboxed shape: bus.jpg and gray.png (both 640x480) as one of four images, zidane.jpg
    (384x640) and odd_333x517.png (640x416) as one of two each. Each image gets what `predict()` gives it alone."""
    paths = [images[n] for n in ("bus.jpg", "zidane.jpg", "odd_333x517.png", "gray.png")] * 2
    with detect_gathering(triton, len(paths), seconds=30):
        before = {model: triton.batch_executions(model) for model in ("detect", "yolov8")}
        results = triton.client("grpc").detect_many(paths, conf=CONF, concurrency=len(paths))
        assert triton.executions_since("detect", before["detect"], len(paths)) == {len(paths): 1}
        assert triton.executions_since("yolov8", before["yolov8"], len(paths)) == {4: 1, 2: 2}
    for path, result in zip(paths, results):
        assert len(result) >= 24
        assert_same_detections(result, reference.predict(str(path), conf=CONF, verbose=False)[0])


def _truncated_jpeg(images) -> bytes:
    data = images["bus.jpg"].read_bytes()
    return data[: len(data) // 2]


@pytest.mark.parametrize("payload, message", [
    (lambda images: b"", "empty"),
    (_truncated_jpeg, "truncated JPEG"),
    (lambda images: b"name,value\nfoo,1\n", "could not be decoded"),
    (lambda images: images["bus.jpg"].read_bytes()[:2] + b"\x00" * 300, "could not be decoded"),
])
def test_bad_images_get_clear_errors(client, triton, images, payload, message):
    with pytest.raises(InvalidInputError, match=message):
        client.detect(payload(images))
    assert triton.is_ready()


def send_together(url: str, images: list[bytes]) -> list:
    """One `detect` request per image, sent back to back over one gRPC channel without waiting for answers
    (tritonclient's async_infer); returns each one's (result, error), in order."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    answers: dict[int, tuple] = {}
    done = threading.Semaphore(0)

    def answered(i, result, error):
        answers[i] = (result, error)
        done.release()

    for i, image in enumerate(images):
        tensor = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[image]], dtype=np.object_))
        client.async_infer("detect", [tensor], functools.partial(answered, i),
                           outputs=[grpcclient.InferRequestedOutput("BOXES")])
    for _ in images:
        assert done.acquire(timeout=300), "detect did not answer"
    return [answers[i] for i in range(len(images))]


def test_bad_input_does_not_fail_the_rest_of_the_batch(triton, images):
    """Bad images batched with good ones: the bad ones are answered INVALID_ARG, the good ones get the
    detections they get alone. Batched for certain: `detect` waits for eight requests (detect_gathering), and
    Triton's statistics show the one execution of all eight."""
    client = triton.client("grpc")
    good, bad = images["bus.jpg"].read_bytes(), b"not an image"
    alone = client.detect(good)
    mixed = [bad if i in (1, 6) else good for i in range(8)]
    url = f"http://127.0.0.1:{triton.options.metrics_port}/metrics"
    with detect_gathering(triton, len(mixed), seconds=30):
        before, executions = stats.scrape(url), triton.batch_executions("detect")
        answers = send_together(triton.grpc_url, mixed)
        assert triton.executions_since("detect", executions, len(mixed)) == {len(mixed): 1}
        bls_images = (stats.scrape(url).total("trident_detect_bls_call_images_sum", model="detect")
                      - before.total("trident_detect_bls_call_images_sum", model="detect"))
    assert bls_images == 6  # the good images went to yolov8, the bad ones did not
    for image, (result, error) in zip(mixed, answers):
        if image is bad:
            assert error is not None and "INVALID_ARG" in error.status() and "could not be decoded" in str(error)
        else:
            assert error is None, error
            np.testing.assert_allclose(result.as_numpy("BOXES")[0], alone.boxes, atol=1e-3)
    assert len(alone) >= 24


@pytest.mark.parametrize("conf, iou, message", [(2.0, None, "CONF_THRESHOLD"), (float("nan"), None, "CONF_THRESHOLD"),
                                                (None, -0.1, "IOU_THRESHOLD")])
def test_bad_thresholds(client, images, conf, iou, message):
    with pytest.raises(InvalidInputError, match=message):
        client.detect(images["bus.jpg"], conf=conf, iou=iou)


def test_tiny_image_is_valid(client, reference, tmp_path):
    path = tmp_path / "one.png"
    path.write_bytes(cv2.imencode(".png", np.full((1, 1, 3), 128, np.uint8))[1].tobytes())
    served = client.detect(path, conf=CONF)
    expected = reference.predict(str(path), conf=CONF, verbose=False)[0]
    assert len(served) == len(expected.boxes)
    if len(served):
        assert_same_detections(served, expected)


def test_huge_image(client, triton):
    big = cv2.imencode(".jpg", np.full((10000, 10000, 3), 90, np.uint8))[1].tobytes()
    result = client.detect(big)  # 100 MP: at the limit, served
    assert result.boxes.shape[1] == 4 and (result.boxes <= 10000).all()
    too_big = cv2.imencode(".png", np.zeros((10001, 10000), np.uint8))[1].tobytes()
    with pytest.raises(InvalidInputError, match="above the limit"):
        client.detect(too_big)
    assert triton.is_ready()


def test_many_images_in_one_request_are_refused_clearly(client):
    data = (ASSETS / "bus.jpg").read_bytes()
    with pytest.raises(InvalidInputError, match="exactly one element per request"):
        client.infer("detect", {"IMAGE": np.array([[data], [data]], dtype=object)}, ["BOXES"])


@pytest.mark.parametrize("array, message", [
    (np.zeros((1, 3, 640, 640), np.int32), "data-type|datatype|INT32"),
    (np.zeros((1, 4, 320, 320), np.float32), "shape"),
    (np.zeros((1, 3, 320, 330), np.float32), "height and width must be multiples of 32 up to 640.*got 320x330"),
    (np.zeros((1, 3, 672, 640), np.float32), "height and width must be multiples of 32 up to 640.*got 672x640"),
])
def test_yolov8_rejects_wrong_dtype_and_shape(client, triton, array, message):
    with pytest.raises(InvalidInputError, match=message):
        client.infer("yolov8", {"images": array}, ["output0"])
    assert triton.is_ready()
