"""GPU-host deployment, checked here by real tools: docker-compose, Triton's ModelConfig protobuf, pip, make.

No Docker engine or GPU is needed: what those would run is validated statically (compose file, configs, the
image's requirements, the `make deploy` plan); the local server's warm-up is exercised by every server test.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from export import yolo as export_yolo

ROOT = Path(__file__).resolve().parent.parent
REPO = ROOT / "model_repository"
COMMITTED = ("detect", "easyocr", "whisper")  # yolov8's config is rendered by `python -m export yolo`
# detect's warm-up would make a BLS call before the server is READY, which Triton refuses ("Server not ready"),
# failing detect's load: it has none (yolov8, which it calls, warms up).
NO_WARMUP = {"detect"}
ENV = dict(line.split("=", 1) for line in (ROOT / ".env").read_text().splitlines()
           if line.strip() and not line.startswith("#"))
METADATA = {"task": "detect", "stride": 32, "imgsz": [640, 640], "batch": 1, "dynamic": False,
            "names": {i: f"class{i}" for i in range(80)}}
FP_BYTES = {"TYPE_FP32": 4, "TYPE_INT32": 4, "TYPE_FP16": 2, "TYPE_BOOL": 1}


def parse_config(text: str) -> model_config_pb2.ModelConfig:
    """Parse with Triton's own ModelConfig message: unknown fields or bad values raise."""
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def signature(config: model_config_pb2.ModelConfig) -> tuple:
    """Name, type and shape of every input and output, plus max_batch_size: what clients depend on."""
    def tensors(items):
        return tuple((t.name, t.data_type, tuple(t.dims), getattr(t, "optional", False)) for t in items)

    return config.max_batch_size, tensors(config.input), tensors(config.output)


def compose_config(env: dict[str, str] | None = None) -> dict:
    """docker-compose.yml as `docker-compose config` validates and resolves it with .env (and `env`)."""
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.fail("docker-compose (Debian package) is missing: run `make system-deps`")
    result = subprocess.run([tool, "--project-directory", str(ROOT), "-f", str(ROOT / "docker-compose.yml"),
                             "--env-file", str(ROOT / ".env"), "config"],
                            capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})
    assert result.returncode == 0, f"docker-compose config rejected docker-compose.yml:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


# --- docker-compose.yml + .env --------------------------------------------------------------------------------

def test_compose_file_validates_with_env_defaults():
    triton = compose_config()["services"]["triton"]
    assert triton["image"] == "trident-triton:24.10"
    assert (ROOT / triton["build"]["context"] / triton["build"]["dockerfile"]).is_file()
    ports = {p["target"]: p["published"] for p in triton["ports"]}
    assert ports == {8000: int(ENV["HTTP_PORT"]), 8001: int(ENV["GRPC_PORT"]), 8002: int(ENV["METRICS_PORT"])}
    device = triton["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert device["device_ids"] == [ENV["TRIDENT_GPUS"]]
    assert triton["shm_size"] == ENV["SHM_SIZE"]
    assert triton["ulimits"] == {"memlock": -1, "stack": 67108864}
    assert triton["healthcheck"]["test"][1:4] == ["python3", "-m", "trident_serving.supervisor"]  # ready + models
    assert triton["restart"] == "unless-stopped"
    mounts = {v.split(":")[1]: v for v in triton["volumes"]}
    assert mounts["/models"].endswith(":ro"), "the model repository is mounted read-only"
    assert mounts["/models/yolov8/trt_cache"].endswith(":rw")


def test_compose_command_flags():
    command = compose_config()["services"]["triton"]["command"]
    assert isinstance(command, list) and command[:5] == ["python3", "-m", "trident_serving.supervisor", "--",
                                                          "tritonserver"]
    command = command[4:]
    flags = dict(arg.split("=", 1) for arg in command[1:])
    assert flags["--model-repository"] == "/models"
    assert "--metrics-config" in flags and flags["--metrics-config"] == "summary_latencies=true"
    pool = int(flags["--cuda-memory-pool-byte-size"].split(":")[1])
    # One BLS call of `detect` at its max_batch_size: the letterboxed FP32 input and yolov8's output.
    detect = parse_config((REPO / "detect" / "config.pbtxt").read_text())
    batch = detect.max_batch_size
    assert pool >= batch * 3 * 640 * 640 * 4 + batch * 84 * export_yolo.ANCHORS * 4
    assert int(flags["--pinned-memory-pool-byte-size"]) == int(ENV["PINNED_POOL_BYTES"])
    python_shm = [a for a in command if a.startswith("--backend-config=python,shm-")]
    assert len(python_shm) == 2


def test_compose_reads_ports_and_gpus_from_the_environment():
    triton = compose_config({"HTTP_PORT": "18000", "TRIDENT_GPUS": "1,2"})["services"]["triton"]
    assert {p["target"]: p["published"] for p in triton["ports"]}[8000] == 18000
    assert triton["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["1,2"]


def test_dockerfile_builds_from_the_stock_image_with_pinned_requirements():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert dockerfile.splitlines()[2] == "FROM nvcr.io/nvidia/tritonserver:24.10-py3"
    for source in ("deploy/requirements-image.txt", "deploy/requirements-image-nodeps.txt", "serving/"):
        assert source in dockerfile and (ROOT / source).exists()
    for line in requirement_lines("requirements-image.txt") + requirement_lines("requirements-image-nodeps.txt"):
        assert "==" in line, f"unpinned image requirement: {line}"
    # The BuildKit ignore file keeps the virtual environment and weights out of the build context.
    ignore = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") + 1:] and all(
        (ROOT / line.lstrip("!").rstrip("/")).exists() for line in ignore if line.startswith("!"))


# --- model configs --------------------------------------------------------------------------------------------

def warmup_file_size(data_type: int, dims, path: Path) -> None:
    """Check that a warm-up file holds exactly one batch element of the declared input."""
    content = path.read_bytes()
    name = model_config_pb2.DataType.Name(data_type)
    count = int(np.prod(dims))
    if name == "TYPE_STRING":  # each element: 4-byte little-endian length, then the bytes
        offset = 0
        for _ in range(count):
            length = int.from_bytes(content[offset:offset + 4], "little")
            offset += 4 + length
        assert offset == len(content), f"{path}: not {count} serialized string element(s)"
    else:
        assert len(content) == count * FP_BYTES[name], f"{path}: {len(content)} bytes for {name} {list(dims)}"


def check_warmup(config: model_config_pb2.ModelConfig, folder: Path, largest: bool = True) -> None:
    """Warm-up at batch 1 and (`largest`) at max_batch_size, every required input given, files well formed."""
    inputs = {t.name: t for t in config.input}
    assert {w.batch_size for w in config.model_warmup} == ({1, config.max_batch_size} if largest else {1})
    for sample in config.model_warmup:
        required = {name for name, t in inputs.items() if not t.optional}
        assert required <= set(sample.inputs), f"{sample.name} lacks inputs {required - set(sample.inputs)}"
        for name, data in sample.inputs.items():
            assert data.data_type == inputs[name].data_type
            assert all(d > 0 for d in data.dims)
            if data.WhichOneof("input_data_type") == "input_data_file":
                path = folder / "warmup" / data.input_data_file
                assert path.is_file(), f"warm-up file {path} is missing"
                assert path.stat().st_size <= 64 * 1024, f"{path} is larger than a small sample"
                warmup_file_size(data.data_type, data.dims, path)


@pytest.mark.parametrize("model", COMMITTED)
def test_committed_config_parses_and_warms_up_with_shipped_samples(model):
    config = parse_config((REPO / model / "config.pbtxt").read_text())
    assert config.name == model
    if model in NO_WARMUP:
        assert not config.model_warmup and not (REPO / model / "warmup").exists()
    else:
        check_warmup(config, REPO / model)


def test_every_yolov8_flavour_parses_with_the_same_signature():
    rendered = {(flavour, kind): parse_config(export_yolo.yolov8_config(flavour, kind, 64, METADATA))
                for flavour, kind in (("onnxruntime", "gpu"), ("onnxruntime", "cpu"), ("tensorrt", "gpu"),
                                      ("python", "cpu"))}
    signatures = {signature(config) for config in rendered.values()}
    assert len(signatures) == 1
    assert rendered["tensorrt", "gpu"].platform == "tensorrt_plan"
    assert rendered["tensorrt", "gpu"].default_model_filename == "model.plan"
    for (flavour, kind), config in rendered.items():
        check_warmup(config, REPO / "yolov8", largest=kind == "gpu")  # CPU: batch 1 only (export/yolo.py)
    trt = rendered["onnxruntime", "gpu"].optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert trt.name == "tensorrt"
    assert trt.parameters["trt_engine_cache_path"] == "/models/yolov8/trt_cache"
    assert trt.parameters["trt_profile_max_shapes"] == "images:64x3x640x640"
    assert trt.parameters["trt_profile_min_shapes"] == "images:1x3x640x640"
    assert not rendered["onnxruntime", "cpu"].HasField("optimization")
    # detect's BLS call sends yolov8 exactly what yolov8 declares
    detect = parse_config((REPO / "detect" / "config.pbtxt").read_text())
    assert detect.max_batch_size == rendered["python", "cpu"].max_batch_size


# --- the tensorrt flavour: complete or refused ----------------------------------------------------------------

def export_tensorrt(repo: Path, *extra: str) -> str:
    """Run `python -m export yolo --flavour tensorrt` in-process; returns its refusal message ('' on success)."""
    from export.__main__ import main

    try:
        assert main(["yolo", "--weights", "synthetic", "--flavour", "tensorrt", "--repo", str(repo), *extra]) == 0
    except SystemExit as exc:
        return str(exc)
    return ""


def fake_engine(repo: Path, onnx_sha256: str, max_batch_size: int = 64) -> None:
    """What deploy/build_engine.sh leaves behind (the plan's bytes matter only to TensorRT)."""
    yolov8 = repo / "yolov8"
    (yolov8 / "1").mkdir(parents=True, exist_ok=True)
    (yolov8 / "1" / "model.onnx").write_bytes(b"onnx bytes")
    (yolov8 / "1" / "model.plan").write_bytes(b"plan bytes")
    (yolov8 / "engine.json").write_text(json.dumps({"onnx_sha256": onnx_sha256, "max_batch_size": max_batch_size}))


def test_tensorrt_flavour_without_an_engine_says_how_to_build_one(tmp_path):
    refusal = export_tensorrt(tmp_path)
    assert "needs a TensorRT engine" in refusal and "make engines" in refusal
    assert not (tmp_path / "yolov8" / "config.pbtxt").exists()


def test_tensorrt_flavour_refuses_a_stale_engine(tmp_path):
    fake_engine(tmp_path, onnx_sha256="0" * 64)
    assert "was not built from the current" in export_tensorrt(tmp_path)


def test_tensorrt_flavour_renders_the_plan_config_for_a_current_engine(tmp_path):
    import hashlib

    from export.download import CACHE_DIR

    fake_engine(tmp_path, hashlib.sha256(b"onnx bytes").hexdigest())
    weights = CACHE_DIR / "yolov8n-synthetic-seed0.pt"
    (tmp_path / "export.json").write_text(json.dumps({"yolov8": {"weights": str(weights)}}))
    assert "MAX_BATCH=32" in export_tensorrt(tmp_path, "--max-batch-size", "32")
    assert export_tensorrt(tmp_path, "--kind", "cpu").startswith("--flavour tensorrt serves on a GPU only")
    assert export_tensorrt(tmp_path) == ""
    config = parse_config((tmp_path / "yolov8" / "config.pbtxt").read_text())
    assert config.platform == "tensorrt_plan" and config.default_model_filename == "model.plan"
    assert signature(config) == signature(parse_config(export_yolo.yolov8_config("python", "cpu", 64, METADATA)))
    assert (tmp_path / "yolov8" / "1" / "model.plan").read_bytes() == b"plan bytes"


# --- `make deploy DRY_RUN=1` ----------------------------------------------------------------------------------

def test_make_deploy_dry_run_prints_the_whole_plan():
    result = subprocess.run(["make", "--no-print-directory", "deploy", "DRY_RUN=1"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    plan = result.stdout
    expected = [
        "docker info", "docker compose version", "json .Runtimes", "nvidia-smi -L",  # prerequisites
        "-m export whisper", "-m export easyocr", "-m export yolo", "--flavour onnxruntime",  # weights
        "docker compose build triton",
        "docker compose run --rm --no-deps", "/usr/src/tensorrt/bin/trtexec", "--fp16",
        "--minShapes=images:1x3x640x640", "--maxShapes=images:64x3x640x640", "--timingCacheFile=",
        "--flavour tensorrt",
        "docker compose up -d", "Health.Status",
        "trident --url localhost:8001 health", "detect", "transcribe", "ocr",
        "http://", f":{ENV['HTTP_PORT']}/v2/health/ready", f":{ENV['METRICS_PORT']}/metrics",
    ]
    missing = [text for text in expected if text not in plan]
    assert not missing, f"the dry run does not show {missing}:\n{plan}"
    positions = [plan.index(text) for text in ("docker info", "-m export whisper", "docker compose build",
                                               "trtexec", "docker compose up -d", "trident --url")]
    assert positions == sorted(positions), "the plan runs out of order"


def test_make_engines_dry_run_keeps_profile_consistent_with_max_batch():
    result = subprocess.run(["make", "--no-print-directory", "engines", "DRY_RUN=1", "MAX_BATCH=16"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--maxShapes=images:16x3x640x640" in result.stdout and "--optShapes=images:4x3x640x640" in result.stdout
    assert result.stdout.count("--max-batch-size 16") == 2
    for target in ("down", "logs"):
        dry = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert dry.returncode == 0 and "docker compose" in dry.stdout


# --- the image's requirements resolve for the container's Python ---------------------------------------------

def requirement_lines(name: str) -> list[str]:
    lines = (ROOT / "deploy" / name).read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


PIP_TARGET = ["--python-version", "3.10", "--implementation", "cp", "--abi", "cp310",
              # Ubuntu 22.04 in the 24.10 image: glibc 2.35, so every manylinux tag up to 2_35
              *[arg for minor in range(35, 16, -1) for arg in ("--platform", f"manylinux_2_{minor}_x86_64")],
              "--platform", "manylinux2014_x86_64"]


def pip_resolve(tmp_path: Path, requirements: str, *options: str) -> list[dict]:
    report = tmp_path / f"{requirements}.json"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                             "--report", str(report), "--target", str(tmp_path / "target"), *PIP_TARGET, *options,
                             "-r", str(ROOT / "deploy" / requirements)],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"{requirements} does not resolve for CPython 3.10:\n{result.stderr[-3000:]}"
    return json.loads(report.read_text())["install"]


def test_image_requirements_resolve_for_python_310(tmp_path):
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    try:
        urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=10).close()
    except OSError as exc:
        reason = f"package index unreachable ({exc}): image requirements not resolved"
        print(reason)
        pytest.skip(reason)
    resolved = {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
                for item in pip_resolve(tmp_path, "requirements-image.txt", "--only-binary=:all:")}
    assert resolved["numpy"].startswith("1.")
    assert resolved["torch"] == "2.10.0" and resolved["nvidia-cuda-runtime-cu12"].startswith("12.8.")
    assert "opencv-python" not in resolved and "opencv-python-headless" in resolved
    # The --no-deps packages: each must exist for 3.10, and its own requirements must be met by the set above
    # (ultralytics' GUI `opencv-python` is replaced by the headless build, which provides the same `cv2`).
    environment = {"python_version": "3.10", "python_full_version": "3.10.12", "sys_platform": "linux",
                   "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}
    for item in pip_resolve(tmp_path, "requirements-image-nodeps.txt", "--no-deps"):
        for line in item["metadata"].get("requires_dist", []):
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate(environment):
                continue
            name = canonicalize_name(requirement.name)
            name = "opencv-python-headless" if name == "opencv-python" else name
            assert name in resolved, f"{item['metadata']['name']} needs {line}: not in requirements-image.txt"
            assert requirement.specifier.contains(resolved[name], prereleases=True), \
                f"{item['metadata']['name']} needs {line}, the image gets {name}=={resolved[name]}"
