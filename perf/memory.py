"""`python -m perf.memory`: measure what one instance of each model costs on a GPU, for `python -m export plan`.

For each model of an exported repository, alone (detect with its yolov8): copy it into a scratch repository
with one KIND_GPU instance and no budget, start the server with TRIDENT_GPU_MEMORY_LOG set, and record NVML's
per-process memory of the server and of each Python stub (their PIDs) once loaded, after a batch of 1 and after
the largest batch; the stubs that batch through `serve_batch` add PyTorch's counters per batch size. Written as
JSON in the planner's `--measured` format:

    weights     = PyTorch allocated before the first request
    activations = line through PyTorch's peak per batch size less the weights (detect, easyocr); else
                  NVML's growth from batch 1 to the largest batch (whisper's thread, onnxruntime's yolov8)
    context     = the stub's NVML memory less PyTorch's reserved pool (median of those stubs for the others)

whisper's entry also records the engine and compute type it was measured on (`variant`): the planner uses it
only for a repository whose whisper runs the same. On the ctranslate2 engine PyTorch sees none of CTranslate2's
memory: its weights and pools count in the context, and the sum is what NVML saw.

    python -m perf.memory --repo model_repository --out perf/results/memory.json
    python -m export plan --gpu-memory 80GiB --measured perf/results/memory.json

Refuses (exit 2) on a machine without an NVIDIA GPU.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from export.plan import replace_block, whisper_variant
from trident_serving import gpu, plan as planner, server

ROOT = Path(__file__).resolve().parent.parent
TOGETHER = {"detect": ["yolov8", "detect"]}  # BLS: detect needs yolov8 loaded beside it


def gpu_count() -> int:
    """NVIDIA GPUs NVML sees (0 without a driver)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount()
    except Exception:  # noqa: BLE001 - no library, no driver or no device all mean: no GPU
        return 0


def process_memory_mib(device: int = 0) -> dict[int, float]:
    """NVML: GPU memory used by each process on `device`, by PID."""
    import pynvml

    handle = pynvml.nvmlDeviceGetHandleByIndex(device)
    return {p.pid: (p.usedGpuMemory or 0) / gpu.MIB for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}


def children(pid: int) -> list[int]:
    """Direct child PIDs of `pid` (the server's Python stubs)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def stage(repo: Path, scratch: Path, models: list[str]) -> None:
    """Copy `models` into `scratch` as one KIND_GPU instance on GPU 0, without budgets or rate limiter."""
    for name in models:
        shutil.copytree(repo / name, scratch / name, ignore=shutil.ignore_patterns("__pycache__"))
        config = scratch / name / "config.pbtxt"
        text = replace_block(config.read_text(), "instance_group",
                             "instance_group [ { count: 1 kind: KIND_GPU gpus: [ 0 ] } ]")
        config.write_text(re.sub(r'parameters\s*\{\s*key:\s*"gpu_memory_mib"\s*value\s*\{[^}]*\}\s*\}', "", text))


def max_batch(config: Path) -> int:
    text = config.read_text()
    windows = re.search(r'key:\s*"max_windows_per_step"\s*value\s*\{\s*string_value:\s*"(\d+)"', text)
    return int(windows.group(1)) if windows else int(re.search(r"max_batch_size:\s*(\d+)", text).group(1))


def burst(url: str, model: str, batch: int) -> None:
    """`batch` concurrent requests, so the dynamic batcher (or whisper's scheduler) forms the largest batch."""
    from trident import Client

    client = Client(url, protocol="grpc", timeout=600)
    if model == "whisper":
        audio = np.random.default_rng(0).uniform(-0.1, 0.1, 30 * 16000).astype(np.float32)
        call = lambda: client.transcribe(audio, temperature=[0.0])  # noqa: E731
    else:  # a 810x1080 street photo: a typical camera image for detection, a busy page for OCR
        from ultralytics.utils import ASSETS

        image = (ASSETS / "bus.jpg").read_bytes()
        call = (lambda: client.read_text(image)) if model == "easyocr" else (lambda: client.detect(image))
    with concurrent.futures.ThreadPoolExecutor(batch) as pool:
        for future in [pool.submit(call) for _ in range(batch)]:
            future.result()


def measure(repo: Path, model: str, work: Path) -> dict:
    """Costs of `model` (and of what it needs beside it) alone on GPU 0: {model name: planner entry}."""
    scratch = work / model
    log_dir = work / f"{model}-torch"
    stage(repo, scratch, TOGETHER.get(model, [model]))
    batch = max_batch(scratch / model / "config.pbtxt")
    os.environ[gpu.MEMORY_LOG_ENV] = str(log_dir)
    options = server.ServerOptions(repository=scratch, run_dir=work / f"{model}-run", http_port=18000,
                                   grpc_port=18001, metrics_port=18002, rate_limit="off")
    pid = server.start(options)
    try:
        loaded = process_memory_mib()
        url = f"127.0.0.1:{options.grpc_port}"
        burst(url, model, 1)
        single = process_memory_mib()
        burst(url, model, batch)
        time.sleep(1)
        warm = process_memory_mib()
        stubs = [p for p in children(pid) if p in warm]
    finally:
        server.stop(options)
    counters = {stub: json.loads((log_dir / f"{model}-{stub}.json").read_text())
                if (log_dir / f"{model}-{stub}.json").is_file() else {} for stub in stubs}
    # Stubs PyTorch can account for tell the context (NVML less PyTorch's reserved pool) of the others.
    contexts = [warm[s] - max(r["reserved_mib"] for r in c.values()) for s, c in counters.items() if c]
    context = statistics.median(contexts) if contexts else planner.STUB_CONTEXT_MIB
    results = {}
    for stub in stubs:
        name = model if counters[stub] or len(stubs) == 1 else next(m for m in TOGETHER[model] if m != model)
        nvml = (loaded.get(stub, 0.0), single.get(stub, 0.0), warm[stub])
        results[name] = entry(nvml, counters[stub], batch, context)
        results[name]["server_mib"] = round(loaded.get(pid, 0.0), 1)
    if "whisper" in results:  # the plan uses it only for a repository serving the same engine
        results["whisper"]["variant"] = whisper_variant(repo)
    return results


def entry(nvml: tuple[float, float, float], counters: dict, batch: int, context: float) -> dict:
    """One instance's planner entry from NVML (loaded, after batch 1, after the largest batch) and PyTorch."""
    weights = counters.get("loaded", {}).get("allocated_mib", 0.0)
    peaks = {int(k[5:]): v["peak_allocated_mib"] - weights for k, v in counters.items() if k.startswith("batch")}
    if len(peaks) >= 2:  # PyTorch's own peaks per batch size: a least-squares line through them
        per_item, base = fit(peaks)
        source = f"PyTorch peaks at batches {sorted(peaks)}"
        context = nvml[2] - max(r["reserved_mib"] for r in counters.values())
    else:  # NVML alone (whisper's thread, onnxruntime): what the process holds beyond context and weights
        if not counters:
            weights = max(0.0, nvml[0] - context)  # onnxruntime: weights and its arena at load, together
        at_one, at_max = nvml[1] - context - weights, nvml[2] - context - weights
        per_item = max(0.0, (at_max - at_one) / (batch - 1)) if batch > 1 else at_max
        base = max(0.0, at_one - per_item)
        source = "NVML per process (context from the PyTorch-accounted stubs)"
    return {"context_mib": round(context, 1), "weights_mib": round(weights, 1),
            "activation_base_mib": round(base, 1), "activation_per_item_mib": round(per_item, 2),
            "max_batch": batch, "nvml_mib": {"loaded": nvml[0], "batch1": nvml[1], f"batch{batch}": nvml[2]},
            "torch": counters, "note": f"measured ({source})"}


def fit(points: dict[int, float]) -> tuple[float, float]:
    """(slope, intercept >= 0) of the least-squares line through {batch: MiB}."""
    xs, ys = list(points), list(points.values())
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return max(0.0, slope), max(0.0, mean_y - slope * mean_x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=ROOT / "model_repository", help="exported model repository")
    parser.add_argument("--models", default="detect,easyocr,whisper", help="models to measure, one at a time")
    parser.add_argument("--out", type=Path, default=ROOT / "perf" / "results" / "memory.json")
    args = parser.parse_args(argv)
    if gpu_count() == 0:
        print("perf.memory: no NVIDIA GPU here (NVML finds no device): GPU memory can only be measured on a GPU "
              "host; `python -m export plan` uses its documented defaults meanwhile", file=sys.stderr)
        return 2
    import pynvml

    results: dict = {"machine": f"{pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))}, "
                                f"driver {pynvml.nvmlSystemGetDriverVersion()}", "models": {}}
    with tempfile.TemporaryDirectory(prefix="trident-memory-") as work:
        for model in args.models.split(","):
            print(f"measuring {model} ...", flush=True)
            measured = measure(args.repo, model, Path(work))
            results["models"].update(measured)
            print(json.dumps(measured), flush=True)
    servers = [m.pop("server_mib") for m in results["models"].values()]
    results["server_mib"] = max(servers) if servers else planner.SERVER_MIB
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
