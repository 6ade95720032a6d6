"""The exporters refuse what they were not built for, naming the file and what it holds (real files: synthetic
checkpoints, EasyOCR's released English files, damaged copies), and `export yolo --max-batch-size` reaches
`detect`, which then calls `yolov8` in batches it accepts (real server)."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import easyocr_en_models
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from ultralytics.utils import ASSETS

from conftest import serve
from export import __main__ as export_main
from export import whisper as export_whisper
from export import yolo as export_yolo
from trident.stats import scrape

ENGLISH = Path(easyocr_en_models.model_dir())  # EasyOCR's released craft_mlt_25k.pth and english_g2.pth


def export(capsys, *argv: str) -> tuple[int, str]:
    """Run `python -m export ...` in-process; its exit code (a SystemExit's message counts as 1) and stderr."""
    try:
        code, message = export_main.main(list(argv)), ""
    except SystemExit as exc:
        code, message = 1, str(exc)
    return code, message + capsys.readouterr().err


def parse(config: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(config.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def yolo_pt() -> Path:
    return export_yolo.synthetic_checkpoint("n", 0)


@pytest.fixture(scope="module")
def whisper_pt() -> Path:
    return export_whisper.synthetic_checkpoint("tiny", 0)


def ultralytics_checkpoint(folder: Path, architecture: str) -> Path:
    """An ultralytics checkpoint of `architecture` (a model yaml) with random weights, saved as ultralytics does."""
    from ultralytics import YOLO

    path = folder / f"{architecture}.pt"
    YOLO(f"{architecture}.yaml").save(path)
    return path


# --- YOLO -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("given, found", [
    ("whisper", "is a dict with keys 'dims', 'model_state_dict', not an ultralytics YOLOv8 detection checkpoint"),
    ("text", "is not a PyTorch checkpoint (6 bytes beginning b'hello\\n'), not an ultralytics YOLOv8"),
    ("yolov8n-seg", "holds an ultralytics yolov8n-seg model for task 'segment', expected a YOLOv8 detection model"),
    ("yolo11n", "holds an ultralytics yolo11n model for task 'detect', expected a YOLOv8 detection model"),
])
def test_yolo_refuses_what_is_not_a_yolov8_detection_checkpoint(tmp_path, capsys, whisper_pt, given, found):
    if given == "whisper":
        path = whisper_pt
    elif given == "text":
        path = tmp_path / "notes.pt"
        path.write_text("hello\n")
    else:
        path = ultralytics_checkpoint(tmp_path, given)
    code, message = export(capsys, "yolo", "--weights", str(path), "--flavour", "python", "--repo",
                           str(tmp_path / "repo"))
    assert code == 2 and f"export yolo: {path} {found}" in message
    assert not (tmp_path / "repo" / "yolov8").exists()


def test_yolo_checks_the_size_of_a_local_checkpoint(tmp_path, capsys, yolo_pt):
    assert export_yolo.check_checkpoint(yolo_pt) == "n"  # a local file's size is its own...
    code, message = export(capsys, "yolo", "--weights", str(yolo_pt), "--size", "s", "--repo", str(tmp_path))
    assert code == 2 and f"{yolo_pt} holds yolov8n, but --size s asks for yolov8s" in message  # ...or refused


def test_yolo_refuses_a_batch_below_one(tmp_path, capsys):
    code, message = export(capsys, "yolo", "--weights", "synthetic", "--max-batch-size", "0", "--repo", str(tmp_path))
    assert code == 1 and "--max-batch-size 0: must be at least 1" in message


def test_tensorrt_flavour_refuses_an_engine_built_from_other_weights(tmp_path, capsys, yolo_pt):
    """The engine is current for the repository's model.onnx, but that ONNX came from other weights."""
    yolov8 = tmp_path / "yolov8"
    (yolov8 / "1").mkdir(parents=True)
    (yolov8 / "1" / "model.onnx").write_bytes(b"onnx exported from yolov8s.pt")
    (yolov8 / "1" / "model.plan").write_bytes(b"plan")
    (yolov8 / export_yolo.ENGINE_INFO).write_text(json.dumps({
        "onnx_sha256": hashlib.sha256(b"onnx exported from yolov8s.pt").hexdigest(), "max_batch_size": 64}))
    other = tmp_path / "yolov8s.pt"
    (tmp_path / "export.json").write_text(json.dumps({"yolov8": {"weights": str(other)}}))
    code, message = export(capsys, "yolo", "--weights", str(yolo_pt), "--flavour", "tensorrt", "--repo",
                           str(tmp_path))
    assert code == 1
    assert f"{yolov8 / '1' / 'model.onnx'} was exported from {other}, not {yolo_pt}: rebuild the engine" in message
    assert not (yolov8 / "config.pbtxt").exists()


# --- Whisper ----------------------------------------------------------------------------------------------------

def test_whisper_refuses_a_yolo_checkpoint(tmp_path, capsys, yolo_pt):
    """`make deploy WEIGHTS=yolov8n.pt` once copied the YOLO file as whisper/1/model.pt."""
    code, message = export(capsys, "whisper", "--weights", str(yolo_pt), "--repo", str(tmp_path))
    assert code == 2
    assert (f"export whisper: {yolo_pt} is an ultralytics DetectionModel checkpoint, not an openai-whisper "
            "checkpoint (a dict of 'dims' and 'model_state_dict')") in message
    assert not (tmp_path / "whisper").exists()


@pytest.mark.parametrize("damage, found", [
    ("drop a tensor", "1 of its 167 tensors missing ('decoder.ln.bias', ...)"),
    ("base dims", "of other shapes ('encoder.positional_embedding' is [1500, 384], expected [1500, 512])"),
    ("wider embedding", "1 of other shapes ('decoder.token_embedding.weight' is [51866, 384], expected [51865, 384])"),
])
def test_whisper_refuses_a_state_dict_its_dims_do_not_describe(tmp_path, capsys, whisper_pt, damage, found):
    checkpoint = torch.load(whisper_pt, map_location="cpu", weights_only=True)
    state = checkpoint["model_state_dict"]
    if damage == "drop a tensor":
        del state["decoder.ln.bias"]
    elif damage == "base dims":
        checkpoint["dims"] = dict(zip(export_whisper.DIM_NAMES, export_whisper.DIMS["base"]))
    else:
        state["decoder.token_embedding.weight"] = torch.zeros(51866, 384, dtype=torch.float16)
    path = tmp_path / "damaged.pt"
    torch.save(checkpoint, path)
    code, message = export(capsys, "whisper", "--weights", str(path), "--repo", str(tmp_path / "repo"))
    assert code == 2 and f"{path}: its model_state_dict is not the Whisper its dims describe: " in message
    assert found in message


def test_whisper_takes_the_size_of_a_local_checkpoint(tmp_path, capsys, whisper_pt):
    code, message = export(capsys, "whisper", "--weights", str(whisper_pt), "--size", "base", "--repo", str(tmp_path))
    assert code == 2 and f"--size base contradicts --weights {whisper_pt}, which holds a Whisper tiny" in message
    assert export(capsys, "whisper", "--weights", str(whisper_pt), "--kind", "cpu", "--repo", str(tmp_path))[0] == 0
    assert json.loads((tmp_path / "export.json").read_text())["whisper"]["size"] == "tiny"  # not the default small
    assert (tmp_path / "whisper" / "1" / "model.pt").read_bytes() == whisper_pt.read_bytes()


# --- EasyOCR ----------------------------------------------------------------------------------------------------

def easyocr_folder(folder: Path, files: dict[str, Path]) -> Path:
    """A weights folder holding `files` (name -> the file it links to)."""
    folder.mkdir()
    for name, target in files.items():
        (folder / name).symlink_to(target)
    return folder


def test_easyocr_refuses_a_file_and_a_folder_for_other_languages(tmp_path, capsys, yolo_pt):
    code, message = export(capsys, "easyocr", "--weights", str(yolo_pt), "--repo", str(tmp_path / "repo"))
    assert code == 2 and (f"--weights {yolo_pt}: it is an ultralytics DetectionModel checkpoint; expected 'official', "
                          "'synthetic' or a directory holding craft_mlt_25k.pth and korean_g2.pth") in message
    code, message = export(capsys, "easyocr", "--weights", str(ENGLISH), "--repo", str(tmp_path / "repo"))
    assert code == 2 and (f"--weights {ENGLISH}: no korean_g2.pth there (it is a directory holding "
                          "craft_mlt_25k.pth, english_g2.pth); --lang ko,en needs") in message
    assert not (tmp_path / "repo" / "easyocr" / "1" / "weights").exists()


def test_easyocr_names_what_a_wrong_file_holds(tmp_path, capsys, yolo_pt):
    renamed = easyocr_folder(tmp_path / "renamed", {"craft_mlt_25k.pth": ENGLISH / "craft_mlt_25k.pth",
                                                    "korean_g2.pth": ENGLISH / "english_g2.pth"})
    code, message = export(capsys, "easyocr", "--weights", str(renamed), "--repo", str(tmp_path / "repo"))
    assert code == 2 and (f"{renamed / 'korean_g2.pth'} is not EasyOCR's korean_g2.pth: 2 of other shapes "
                          "('Prediction.weight' is [97, 256], expected [1009, 256])") in message
    swapped = easyocr_folder(tmp_path / "swapped", {"craft_mlt_25k.pth": yolo_pt,
                                                    "english_g2.pth": ENGLISH / "english_g2.pth"})
    code, message = export(capsys, "easyocr", "--lang", "en", "--weights", str(swapped), "--repo",
                           str(tmp_path / "repo"))
    assert code == 2 and (f"{swapped / 'craft_mlt_25k.pth'} is an ultralytics DetectionModel checkpoint, not "
                          "EasyOCR's craft_mlt_25k.pth") in message


def test_easyocr_refuses_changed_values(tmp_path, capsys):
    """Right layers, other values (fine-tuned or damaged): the Reader would refuse it at load, so export does."""
    state = torch.load(ENGLISH / "english_g2.pth", map_location="cpu", weights_only=True)
    state["module.Prediction.bias"][0] += 1
    folder = easyocr_folder(tmp_path / "changed", {"craft_mlt_25k.pth": ENGLISH / "craft_mlt_25k.pth"})
    torch.save(state, folder / "english_g2.pth")
    code, message = export(capsys, "easyocr", "--lang", "en", "--weights", str(folder), "--repo",
                           str(tmp_path / "repo"))
    assert code == 2 and (f"{folder / 'english_g2.pth'} has the layers of english_g2.pth but not EasyOCR's "
                          "released values") in message


# --- yolov8's batch limit reaches detect ------------------------------------------------------------------------

@pytest.mark.yolo
def test_detect_calls_yolov8_in_batches_of_its_max_batch_size(tmp_path, capsys):
    """`export yolo --max-batch-size 8` writes 8 where detect reads it: a detect batch of 12 images makes BLS
    calls of at most 8, none refused by yolov8 (before, detect split by 64 and every larger batch's call failed,
    hidden by the retry in halves)."""
    repo = tmp_path / "repo"
    assert export(capsys, "yolo", "--weights", "synthetic", "--flavour", "python", "--max-batch-size", "8",
                  "--repo", str(repo))[0] == 0
    detect_config = repo / "detect" / "config.pbtxt"
    detect, yolov8 = parse(detect_config), parse(repo / "yolov8" / "config.pbtxt")
    assert yolov8.max_batch_size == 8
    assert detect.parameters["yolov8_max_batch_size"].string_value == "8" and detect.max_batch_size == 64
    images = [ASSETS / "bus.jpg"] * 12  # one letterboxed shape: one group of 12 to split (other shapes: one each)
    # One detect instance that waits (up to 5 s) for all requests: the batch to split is certain to form.
    detect.instance_group[0].count = 1
    detect.dynamic_batching.max_queue_delay_microseconds = 5_000_000
    detect.dynamic_batching.preferred_batch_size[:] = [len(images)]
    detect_config.write_text(text_format.MessageToString(detect))
    yolov8.instance_group[0].count = 1  # and one yolov8 instance: a quicker start
    (repo / "yolov8" / "config.pbtxt").write_text(text_format.MessageToString(yolov8))
    with serve(repo, tmp_path / "run") as triton:
        metrics = f"http://127.0.0.1:{triton.options.metrics_port}/metrics"
        before = scrape(metrics)
        results = triton.client("grpc").detect_many(images, concurrency=len(images))
        after = scrape(metrics)

    def delta(name: str, **labels: str) -> float:
        return after.total(name, **labels) - before.total(name, **labels)

    def calls_up_to(images: float) -> float:
        """BLS calls of at most `images` images: the histogram bucket, whatever the spelling of its `le`."""
        le = next(dict(labels)["le"] for name, labels in after.samples
                  if name == "trident_detect_bls_call_images_bucket" and float(dict(labels)["le"]) == images)
        return delta("trident_detect_bls_call_images_bucket", model="detect", le=le)

    # every chunk answered alike: the same boxes for each copy (bus.jpg has some)
    assert [r.detections for r in results] == [results[0].detections] * 12
    assert results[0].detections
    calls = delta("trident_detect_bls_call_images_count", model="detect")
    executions = delta("nv_inference_exec_count", model="detect")
    assert delta("trident_detect_bls_call_images_sum", model="detect") == 12
    assert calls_up_to(8) == calls  # none above 8
    assert calls >= math.ceil(12 / 8) and calls > executions  # a batch above 8 was split
    assert delta("nv_inference_count", model="yolov8") == 12
    assert delta("nv_inference_request_failure", model="yolov8") == 0
