"""Run the `perf_analyzer` binary of the tritonclient 2.51 wheel and read its verbose CSV.

perf_analyzer needs Debian's libb64-0d and a `libcudart.so.12` on the library path even on a CPU-only
machine; the nvidia-pytriton wheel bundles one under a hashed name, so a symlink with the plain name is made
in a scratch folder (shared/notes/triton-facts.md).
"""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# perf_analyzer's verbose CSV reports every time in microseconds.
LATENCY_COLUMNS = {"p50 latency": "p50_ms", "p90 latency": "p90_ms", "p95 latency": "p95_ms",
                   "p99 latency": "p99_ms", "Avg latency": "avg_ms"}
SERVER_COLUMNS = {"Server Queue": "queue_ms", "Server Compute Input": "compute_input_ms",
                  "Server Compute Infer": "compute_infer_ms", "Server Compute Output": "compute_output_ms",
                  "Client Send": "client_send_ms", "Network+Server Send/Recv": "network_ms",
                  "Client Recv": "client_recv_ms"}
GPU_COLUMNS = {"Avg GPU Utilization": "gpu_utilization", "Max GPU Memory Usage": "gpu_memory_bytes",
               "Avg GPU Power Usage": "gpu_power_w"}


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer failed; the message carries its own output."""


@dataclass
class Measurement:
    """Options of one perf_analyzer run: one model, one input set, one concurrency."""

    model: str
    input_data: Path
    concurrency: int
    url: str = "127.0.0.1:8001"  # gRPC
    metrics_url: str | None = "127.0.0.1:8002/metrics"
    interval_ms: int = 5000  # one measurement window (time_windows mode)
    # count_windows mode instead: a window holds this many requests (for slow or shared machines, where a
    # time window may see no request complete)
    request_count: int | None = None
    stability_percent: float = 10.0  # perf_analyzer's default; relaxed on a shared CPU machine
    max_trials: int = 10
    shared_memory: str = "none"  # "system" for `yolov8`: tensors pass through shared memory, not gRPC
    output_shm_bytes: int = 0  # size of each output region with shared memory
    composing_models: tuple[str, ...] = ()  # BLS models called by `model` (for their server-side split)
    timeout_s: float = 600.0
    extra_args: list[str] = field(default_factory=list)


def library_dir() -> Path:
    """A folder holding `libcudart.so.12` (a symlink to the libcudart bundled by nvidia-pytriton)."""
    import pytriton

    libs = Path(pytriton.__file__).resolve().parent.parent / "nvidia_pytriton.libs"
    found = sorted(libs.glob("libcudart*.so*"))
    if not found:
        raise PerfAnalyzerError(f"no libcudart in {libs}: perf_analyzer cannot start")
    folder = Path(tempfile.gettempdir()) / f"trident-perf-lib-{os.getuid()}"
    folder.mkdir(exist_ok=True)
    link = folder / "libcudart.so.12"
    if not link.exists() or link.resolve() != found[0]:
        tmp = folder / f".libcudart.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(found[0])
        tmp.replace(link)  # atomic: concurrent runs never see a missing link
    return folder


def binary() -> Path:
    """The perf_analyzer of this interpreter's environment (installed by the tritonclient wheel)."""
    path = Path(sys.executable).parent / "perf_analyzer"
    if not path.exists():
        found = shutil.which("perf_analyzer")
        if not found:
            raise PerfAnalyzerError("perf_analyzer not found: pip install tritonclient[all]==2.51.0")
        path = Path(found)
    return path


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(p for p in (str(library_dir()), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def command(m: Measurement, csv_path: Path) -> list[str]:
    args = [str(binary()), "-m", m.model, "-u", m.url, "-i", "grpc", "--input-data", str(m.input_data),
            "--concurrency-range", str(m.concurrency),
            "--stability-percentage", str(m.stability_percent), "--max-trials", str(m.max_trials),
            "-f", str(csv_path), "--verbose-csv"]
    if m.request_count:
        args += ["--measurement-mode", "count_windows", "--measurement-request-count", str(m.request_count)]
    else:
        args += ["--measurement-interval", str(m.interval_ms)]
    if m.metrics_url:
        args += ["--collect-metrics", "--metrics-url", m.metrics_url]
    if m.shared_memory != "none":
        args += ["--shared-memory", m.shared_memory]
        if m.output_shm_bytes:
            args += ["--output-shared-memory-size", str(m.output_shm_bytes)]
    if m.composing_models:
        args += ["--bls-composing-models", ",".join(m.composing_models)]
    return args + list(m.extra_args)


def run(m: Measurement, workdir: Path) -> dict:
    """Run perf_analyzer once; returns its CSV row as a dict of floats (times in ms). Raises PerfAnalyzerError."""
    workdir.mkdir(parents=True, exist_ok=True)
    csv_path = workdir / f"{m.model}-c{m.concurrency}.csv"
    csv_path.unlink(missing_ok=True)
    args = command(m, csv_path)
    try:
        done = subprocess.run(args, capture_output=True, text=True, env=environment(), timeout=m.timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise PerfAnalyzerError(f"perf_analyzer ran past {m.timeout_s:.0f} s: {' '.join(args)}") from exc
    (workdir / f"{m.model}-c{m.concurrency}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0 or not csv_path.exists():
        output = (done.stdout + done.stderr).strip().splitlines()
        message = "\n".join(line for line in output if line.strip())[-3000:]
        raise PerfAnalyzerError(f"perf_analyzer failed (exit {done.returncode}) on {m.model} at concurrency "
                                f"{m.concurrency}:\n{message}\ncommand: {' '.join(args)}")
    return parse_csv(csv_path)


def parse_csv(path: Path) -> dict:
    """The first data row of perf_analyzer's verbose CSV, renamed and converted (usec -> ms)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise PerfAnalyzerError(f"perf_analyzer wrote no measurement to {path}")
    row = rows[0]
    out = {"concurrency": int(row["Concurrency"]), "throughput": float(row["Inferences/Second"])}
    for column, key in {**LATENCY_COLUMNS, **SERVER_COLUMNS}.items():
        if row.get(column):
            out[key] = float(row[column]) / 1000.0
    for column, key in GPU_COLUMNS.items():
        value = row.get(column, "")
        if value:
            # with several GPUs perf_analyzer writes "gpu0:value;gpu1:value;"
            parts = [p.split(":")[-1] for p in value.strip(";").split(";") if p]
            try:
                out[key] = sum(float(p) for p in parts)
            except ValueError:
                pass
    return out
