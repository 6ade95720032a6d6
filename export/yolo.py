"""YOLOv8 detection: `yolov8` (ONNX, served natively or by onnxruntime in Python) and `detect` (end to end)."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from trident_serving.yolo import LETTERBOX_MODES

from .download import CACHE_DIR, DownloadError, fetch, file_digest
from .repository import (add_common_arguments, pbtxt_string, resolve_weights, set_instance_count, set_instance_kind,
                         set_parameter, stage_model, write_manifest)
from .weights import WrongWeights, describe, pickled_classes

SIZES = ("n", "s", "m", "l", "x")
# Instances of `yolov8` and `detect` when the network runs on a CPU: two of each, so that one batch's onnxruntime
# run overlaps another's decoding and NMS instead of leaving a core idle (2-core machine, same run: 9.7 -> 13.0
# images/s at concurrency 4, p50 89 -> 82 ms at concurrency 1; perf/LOG.md).
CPU_INSTANCES = 2
# Official checkpoints, as ultralytics' own downloader names them.
RELEASE_URL = "https://github.com/ultralytics/assets/releases/download/v8.4.0/yolov8{size}.pt"
IMGSZ = 640
# Serving flavours of `yolov8`: the same ONNX file behind different Triton backends.
FLAVOURS = ("onnxruntime", "tensorrt", "python")
CLASS_BIAS_SHIFT = 6.0  # synthetic weights: ~100 boxes on bus.jpg at conf 0.25
# Where docker-compose.yml mounts the repository inside the serving container.
CONTAINER_REPO = "/models"
# Written by deploy/build_engine.sh next to the engine: what it was built from and for.
ENGINE_INFO = "engine.json"
ANCHORS = sum((IMGSZ // stride) ** 2 for stride in (8, 16, 32))  # 8400 predictions per image at 640
# detect's parameter holding yolov8's max_batch_size: it splits its BLS calls to yolov8 by this many images.
DETECT_BLS_BATCH = "yolov8_max_batch_size"
# detect's letterbox modes (trident_serving.yolo.LETTERBOX_MODES): rect, predict()'s default, needs `yolov8` with
# dynamic height and width; square pads every image to 640x640 and runs on a static engine.
MIN_SIDE = 32  # rect's smallest side (one stride), for an image 20 times wider than high
OPT_HW = (384, 640)  # a 16:9 frame letterboxed rect: the shape TensorRT tunes its kernels for


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=SIZES, default=None,
                        help="YOLOv8 size (default n; a local .pt is checked to be of this size, default its own)")
    add_common_arguments(parser, "'official' (download yolov8<size>.pt), 'synthetic' (random weights), or a .pt path",
                         "instance kind (auto: GPU for onnxruntime/tensorrt, CPU for the local python flavour)")
    parser.add_argument("--flavour", choices=FLAVOURS, default="onnxruntime",
                        help="backend serving `yolov8`: onnxruntime (CPU/GPU), tensorrt (GPU; renders the config of an "
                             "engine built by `make engines`) or python (local server)")
    parser.add_argument("--max-batch-size", type=int, default=64,
                        help="max_batch_size of yolov8 (and the TensorRT batch profile's maximum; default 64)")
    parser.add_argument("--letterbox", choices=LETTERBOX_MODES, default="rect",
                        help="how detect letterboxes: rect (default, predict()'s default: minimal padding, yolov8 "
                             "with dynamic height and width; 16:9 frames run at 384x640) or square (every image "
                             "padded to 640x640, for static engines)")


def run(args: argparse.Namespace) -> None:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    kind = args.kind if args.kind != "auto" else ("cpu" if args.flavour == "python" else "gpu")
    if args.flavour == "tensorrt" and kind != "gpu":
        raise SystemExit("--flavour tensorrt serves on a GPU only: drop --kind cpu or pick another flavour")
    if args.max_batch_size < 1:
        raise SystemExit(f"--max-batch-size {args.max_batch_size}: must be at least 1")
    weights = resolve_weights(args.weights, official=lambda: fetch(RELEASE_URL.format(size=args.size or "n")),
                              synthetic=lambda: synthetic_checkpoint(args.size or "n", args.seed))
    # ultralytics publishes no checksums for its assets, and a local path may name anything: check every file
    # (a local one against --size only when given).
    local = args.weights not in ("official", "synthetic")
    try:
        size = check_checkpoint(weights, args.size or (None if local else "n"))
    except WrongWeights as exc:
        if args.weights == "official":
            raise DownloadError(f"{exc}: the download is damaged; delete it and retry") from None
        raise
    if args.flavour == "tensorrt":
        # The engine was built (by `make engines`) from the model.onnx already in the repository: keep both,
        # and copy nothing over them.
        check_engine(Path(args.repo), weights, args.max_batch_size, args.letterbox)
        yolov8 = Path(args.repo) / "yolov8"
        metadata = model_metadata(weights, args.letterbox)
    else:
        yolov8 = stage_model(args.repo, "yolov8")
        metadata = export_onnx(weights, args.letterbox, yolov8 / "1" / "model.onnx")
    (yolov8 / "trt_cache").mkdir(exist_ok=True)  # onnxruntime's TensorRT engine cache (mounted writable)
    (yolov8 / "config.pbtxt").write_text(yolov8_config(args.flavour, kind, args.max_batch_size, metadata))
    detect = stage_model(args.repo, "detect")
    config = detect / "config.pbtxt"
    set_instance_kind(config, args.kind)
    if kind == "cpu":
        set_instance_count(config, CPU_INSTANCES)
    set_parameter(config, "metadata", json.dumps(metadata))
    set_parameter(config, DETECT_BLS_BATCH, str(args.max_batch_size))
    set_parameter(config, "letterbox", args.letterbox)
    write_manifest(args.repo, "yolov8", {"weights": str(weights), "synthetic": args.weights == "synthetic",
                                         "size": size, "flavour": args.flavour, "letterbox": args.letterbox})
    print(f"yolov8 ({args.flavour}, {kind}) and detect ({args.letterbox} letterbox) written to "
          f"{Path(args.repo).resolve()} from {weights}")


def profile_shapes(letterbox: str, max_batch_size: int) -> dict[str, str]:
    """TensorRT's optimisation profile of `images` (min, opt, max) for a letterbox mode, as trtexec and
    onnxruntime's TensorRT provider write it: rect covers every multiple of the stride up to 640 on each side.
    deploy/build_engine.sh builds the same profile; `check_engine` compares what it recorded."""
    sides = {"min": (MIN_SIDE, MIN_SIDE), "opt": OPT_HW, "max": (IMGSZ, IMGSZ)}
    if letterbox == "square":
        sides = dict.fromkeys(sides, (IMGSZ, IMGSZ))
    batches = {"min": 1, "opt": opt_batch_size(max_batch_size), "max": max_batch_size}
    return {k: f"images:{batches[k]}x3x{h}x{w}" for k, (h, w) in sides.items()}


def check_engine(repo: Path, weights: Path, max_batch_size: int, letterbox: str) -> None:
    """Refuse (SystemExit, saying how to fix it) unless `yolov8/1/model.plan` is a current engine for `weights`.

    `deploy/build_engine.sh` writes the plan and `yolov8/engine.json` (the SHA-256 of the model.onnx it was built
    from, its profile): the plan must come from the model.onnx in the repository, exported from these weights,
    with a profile whose maximum is the config's max_batch_size and whose shapes are the letterbox mode's.
    """
    yolov8 = Path(repo) / "yolov8"
    plan, info_path, onnx = yolov8 / "1" / "model.plan", yolov8 / ENGINE_INFO, yolov8 / "1" / "model.onnx"
    how = ("build it with `make engines` (exports model.onnx, runs trtexec inside the trident-triton:24.10 "
           "container on the GPU that will serve it, then renders this config)")
    if not plan.is_file() or not info_path.is_file():
        raise SystemExit(f"--flavour tensorrt needs a TensorRT engine at {plan} (and {info_path.name}): {how}")
    info = json.loads(info_path.read_text())
    if not onnx.is_file() or file_digest(onnx, "sha256") != info.get("onnx_sha256"):
        raise SystemExit(f"{plan} was not built from the current {onnx}: rebuild it; {how}")
    manifest = Path(repo) / "export.json"
    exported = json.loads(manifest.read_text()).get("yolov8", {}) if manifest.is_file() else {}
    if Path(exported.get("weights", "")).resolve() != Path(weights).resolve():
        raise SystemExit(f"{onnx} was exported from {exported.get('weights', 'unknown weights')}, not {weights}: "
                         f"rebuild the engine for these weights; {how}")
    if info.get("max_batch_size") != max_batch_size:
        raise SystemExit(f"{plan} has a batch profile up to {info.get('max_batch_size')}, the config asks for "
                         f"--max-batch-size {max_batch_size}: rebuild with MAX_BATCH={max_batch_size}; {how}")
    expected = profile_shapes(letterbox, max_batch_size)
    built = {k: info.get(f"{k}_shapes", "unknown") for k in ("min", "max")}  # opt only tunes speed
    if built != {k: expected[k] for k in built}:
        raise SystemExit(f"{plan} was built for shapes {built['min']} to {built['max']}, --letterbox {letterbox} "
                         f"sends {expected['min']} to {expected['max']}: rebuild with LETTERBOX={letterbox}; {how}")


def check_checkpoint(path: Path, size: str | None = None) -> str:
    """The size (n, s, m, l or x) of the YOLOv8 detection checkpoint at `path`; WrongWeights, naming what the file
    holds, unless it is one (of `size`, when given)."""
    if not any(c.startswith("ultralytics.nn.tasks.") for c in pickled_classes(path)):
        # checked before ultralytics unpickles it: its loader would try to pip-install modules a pickle names
        raise WrongWeights(f"{path} is {describe(path)}, not an ultralytics YOLOv8 detection checkpoint")
    from ultralytics.nn.tasks import load_checkpoint

    try:
        model, _ = load_checkpoint(str(path))
    except Exception as exc:  # noqa: BLE001 - any load failure means a damaged or foreign file
        raise WrongWeights(f"{path} is an ultralytics checkpoint that does not load ({exc})") from None
    name = Path(model.yaml.get("yaml_file", "")).stem
    # yolov8<scale>.yaml, or yolov8.yaml with the scale inside; any other name is another architecture
    # (yolov8n-p2 has other anchors, yolo11n other layers)
    scale = model.yaml.get("scale") or name[len("yolov8"):]
    if model.task != "detect" or re.fullmatch(r"yolov8[nslmx]?", name) is None or scale not in SIZES:
        raise WrongWeights(f"{path} holds an ultralytics {name or type(model).__name__} model for task "
                           f"'{model.task}', expected a YOLOv8 detection model (yolov8n/s/m/l/x)")
    if size not in (None, scale):
        raise WrongWeights(f"{path} holds yolov8{scale}, but --size {size} asks for yolov8{size}")
    print(f"{path.name}: yolov8{scale} detection checkpoint, sha256 {file_digest(path, 'sha256')}")
    return scale


def synthetic_checkpoint(size: str, seed: int) -> Path:
    """The yolov8<size> architecture with seeded random weights and COCO class names, saved as a .pt.

    Freshly initialised YOLOv8 is dead: activations shrink layer after layer and every box scores the same.
    Two changes to the *weights* (never to the code path) make it useful for parity tests: batch-norm
    statistics calibrated on ultralytics' bundled sample images, and class biases raised so that the default
    thresholds keep dozens of boxes per image.
    """
    import torch
    import yaml
    from ultralytics import YOLO
    from ultralytics.utils import ASSETS, ROOT

    from trident_serving import images, yolo

    path = CACHE_DIR / f"yolov8{size}-synthetic-seed{seed}.pt"
    if path.exists():
        return path
    torch.manual_seed(seed)
    model = YOLO(f"yolov8{size}.yaml", task="detect")
    network = model.model
    samples = [images.decode_image(p.read_bytes()) for p in sorted(ASSETS.glob("*.jpg"))]
    # square: the samples' shapes differ, and one batch needs one
    batch = yolo.to_model_input([yolo.letterbox(image, mode="square") for image in samples], torch.device("cpu"))
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one pass sets the statistics
    network.train()
    with torch.no_grad():
        network(batch)
        for branch in network.model[-1].cv3:  # the class-score convolutions of the Detect head
            branch[-1].bias += CLASS_BIAS_SHIFT
    network.eval()
    network.names = yaml.safe_load((ROOT / "cfg" / "datasets" / "coco8.yaml").read_text())["names"]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part.pt")  # renamed when complete: concurrent exports never read half a file
    model.save(partial)
    partial.rename(path)
    return path


def export_onnx(weights: Path, letterbox: str, destination: Path) -> dict:
    """ONNX with dynamic batch, height and width through ultralytics' exporter, written to `destination`;
    returns the model metadata.

    ultralytics writes the ONNX next to the weights it loads: it loads a private copy of them, so that two exports
    of one cached checkpoint at once (two repositories, a test beside a benchmark) never write the same file.
    """
    from ultralytics import YOLO

    with tempfile.TemporaryDirectory(prefix="trident-yolo-") as folder:
        private = Path(folder) / weights.name
        shutil.copy(weights, private)
        model = YOLO(str(private), task="detect")
        shutil.copy(model.export(format="onnx", dynamic=True, simplify=False, imgsz=IMGSZ, verbose=False),
                    destination)
    return model_metadata(weights, letterbox, model)


def model_metadata(weights: Path, letterbox: str, model=None) -> dict:
    """What ultralytics' Triton client and `detect` need to know: class names, stride, the input size, and
    whether `yolov8` takes any height and width (rect) or only the square."""
    if model is None:
        from ultralytics import YOLO

        model = YOLO(str(weights), task="detect")
    names = {int(k): v for k, v in model.names.items()}
    # ultralytics' Triton client letterboxes rect, as predict() does by default, when its export arguments say
    # `dynamic` (args.dynamic, as its own exporter writes them); false keeps it to a static config's square.
    dynamic = letterbox == "rect"
    return {"task": "detect", "stride": int(max(model.model.stride)), "imgsz": [IMGSZ, IMGSZ],
            "batch": 1, "dynamic": dynamic, "args": {"dynamic": dynamic}, "names": names}


def yolov8_config(flavour: str, kind: str, max_batch_size: int, metadata: dict) -> str:
    """config.pbtxt of `yolov8` for one serving flavour; the I/O signature is identical in all of them.
    Height and width are dynamic when the metadata says so (rect letterbox), else 640x640."""
    backend = {"onnxruntime": 'backend: "onnxruntime"', "tensorrt": 'platform: "tensorrt_plan"',
               "python": 'backend: "python"'}[flavour]
    model_file = {"onnxruntime": "model.onnx", "tensorrt": "model.plan", "python": "model.py"}[flavour]
    accelerator = ""
    if flavour == "onnxruntime" and kind == "gpu":
        # TensorRT inside onnxruntime, the fallback when no trtexec engine is built: the engine it builds on first
        # load is cached in the model folder (writable mount, see docker-compose.yml) for one batch profile
        # 1..max_batch_size, so a restart reuses it; the warm-up below builds it before the model is READY.
        shapes = profile_shapes("rect" if metadata["dynamic"] else "square", max_batch_size)
        cache = f"{CONTAINER_REPO}/yolov8/trt_cache"
        accelerator = f"""
optimization {{ execution_accelerators {{ gpu_execution_accelerator [ {{
  name: "tensorrt"
  parameters {{ key: "precision_mode" value: "FP16" }}
  parameters {{ key: "max_workspace_size_bytes" value: "4294967296" }}
  parameters {{ key: "trt_engine_cache_enable" value: "true" }}
  parameters {{ key: "trt_engine_cache_path" value: "{cache}" }}
  parameters {{ key: "trt_timing_cache_enable" value: "true" }}
  parameters {{ key: "trt_timing_cache_path" value: "{cache}" }}
  parameters {{ key: "trt_profile_min_shapes" value: "{shapes['min']}" }}
  parameters {{ key: "trt_profile_opt_shapes" value: "{shapes['opt']}" }}
  parameters {{ key: "trt_profile_max_shapes" value: "{shapes['max']}" }}
}} ] }} }}"""
    # Warm-up: zeros are as good as an image, at the largest shape. On a GPU, batch 1 and the largest batch
    # (kernel selection, the allocator's pools, TensorRT's profile); on a CPU there is nothing lazy to front-load
    # and a batch of 64 images costs ~0.5 TFLOP at every start, so batch 1 only.
    batches = sorted({1, max_batch_size}) if kind == "gpu" else [1]
    warmup = ",\n".join(
        f'  {{ name: "batch{batch}" batch_size: {batch} inputs {{ key: "images" value {{ data_type: TYPE_FP32 '
        f'dims: [ 3, {IMGSZ}, {IMGSZ} ] zero_data: true }} }} }}' for batch in batches)
    # No queue delay: `detect` hands it whole batches, and under load requests queue while the instance is busy
    # and form the next batch; a delay only adds latency at low load (perf/LOG.md).
    side, anchors = (-1, -1) if metadata["dynamic"] else (IMGSZ, ANCHORS)
    # ultralytics' client parses this as a Python literal (ast.literal_eval), hence repr().
    return f"""name: "yolov8"
{backend}
default_model_filename: "{model_file}"
max_batch_size: {max_batch_size}
input [ {{ name: "images" data_type: TYPE_FP32 dims: [ 3, {side}, {side} ] }} ]
output [ {{ name: "output0" data_type: TYPE_FP32 dims: [ {4 + len(metadata['names'])}, {anchors} ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: 0 default_queue_policy {{ max_queue_size: 256 }} }}
instance_group [ {{ count: {CPU_INSTANCES if kind == "cpu" else 1} kind: KIND_{kind.upper()} }} ]{accelerator}
model_warmup [
{warmup}
]
parameters {{ key: "metadata" value: {{ string_value: {pbtxt_string(repr(metadata))} }} }}
"""


def opt_batch_size(max_batch_size: int) -> int:
    """The batch size TensorRT tunes its kernels for: a quarter of the maximum, the size the dynamic batcher
    typically forms under load (the profile still covers 1..max_batch_size)."""
    return max(1, max_batch_size // 4)
