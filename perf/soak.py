"""`python -m perf.soak`: a bounded mixed-model load; every request must succeed and memory must not creep.

    python -m perf.soak                            # 10 min, concurrency 32, a server started here on loopback
    python -m perf.soak --seconds 120 --url 127.0.0.1:8001 --server-pid 1234     # a local server already running

`--concurrency` clients (threads, one gRPC connection each) send valid requests to the models in turn:
`detect` and `easyocr` on the committed photos and text images, `whisper` on the committed speech (greedy),
`yolov8` on a letterboxed tensor. Reports, per model, requests, failures and latency percentiles (p50, p99,
max), and the resident memory of the server process tree (tritonserver + its stubs) sampled every few seconds:
its growth is measured from the end of the warm-up (the first tenth of the run, at most 60 s) to the end.
Loopback only: a soak is not something to point at a shared server. Exit status 1 if any request failed.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from perf.fuzz import DATA, MODELS, ROOT, serving

LOOPBACK = ("127.0.0.1", "localhost", "[::1]", "::1")


@dataclass
class SoakOptions:
    url: str = "127.0.0.1:8001"
    seconds: float = 600.0
    concurrency: int = 32
    models: tuple[str, ...] = MODELS
    server_pid: int | None = None  # tritonserver or its supervisor: whose memory is sampled
    sample_every: float = 5.0
    timeout: float = 300.0


def requests_by_model() -> dict[str, list[tuple[dict[str, np.ndarray], tuple[str, ...]]]]:
    """Valid requests per model: (inputs with the batch axis, outputs)."""
    from ultralytics.utils import ASSETS

    from perf.inputs import letterboxed

    photos = [(ASSETS / name).read_bytes() for name in ("bus.jpg", "zidane.jpg")]
    pages = [path.read_bytes() for path in sorted(DATA.glob("ocr_*")) if path.suffix in (".png", ".jpg")]
    speech = [path.read_bytes() for path in sorted(DATA.glob("speech_*"))]
    tensor = lambda data: np.array([[data]], dtype=np.object_)  # noqa: E731
    return {
        "detect": [({"IMAGE": tensor(p)}, ("BOXES", "SCORES", "CLASSES", "LABELS")) for p in photos],
        "easyocr": [({"IMAGE": tensor(p)}, ("BOXES", "TEXTS", "SCORES")) for p in pages],
        "whisper": [({"AUDIO": tensor(s), "TEMPERATURE": np.zeros((1, 1), np.float32)},
                     ("TEXT", "LANGUAGE", "SEGMENTS")) for s in speech],
        "yolov8": [({"images": letterboxed(p)[None]}, ("output0",)) for p in photos],
    }


def tree_rss(pid: int) -> dict[str, int]:
    """Resident bytes of tritonserver (found from `pid`, which may be its supervisor) and of each of its stubs."""
    from trident_serving import supervisor

    server = supervisor.triton_pid(pid)
    found = {"tritonserver": _rss(server)}
    for stub in supervisor.find_stubs(server).values():
        found[f"stub:{stub.instance}"] = _rss(stub.pid)
    return found


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run(options: SoakOptions, progress: bool = True) -> dict:
    """Run the load for `seconds`; returns the summary (see the module docstring)."""
    from trident import Client

    host = options.url.rsplit(":", 1)[0]
    if host not in LOOPBACK:
        raise SystemExit(f"soak runs against a loopback server only, not {options.url}")
    catalogue = requests_by_model()
    order = list(options.models)
    latencies: dict[str, list[float]] = defaultdict(list)
    failures: dict[str, list[str]] = defaultdict(list)
    lock = threading.Lock()
    started = time.monotonic()
    deadline = started + options.seconds
    samples: list[tuple[float, dict[str, int]]] = []
    stop = threading.Event()

    def client_loop(index: int) -> None:
        client = Client(options.url, protocol="grpc", timeout=options.timeout)
        turn = index
        while time.monotonic() < deadline:
            model = order[turn % len(order)]
            inputs, outputs = catalogue[model][(turn // len(order)) % len(catalogue[model])]
            turn += 1
            begin = time.perf_counter()
            try:
                client.infer(model, inputs, list(outputs))
                with lock:
                    latencies[model].append(time.perf_counter() - begin)
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                with lock:
                    failures[model].append(f"{type(exc).__name__}: {exc}"[:300])

    def sampler() -> None:
        printed = -30.0
        while not stop.is_set():
            if options.server_pid is not None:
                samples.append((time.monotonic() - started, tree_rss(options.server_pid)))
            if progress and time.monotonic() - started - printed >= 30:
                printed = time.monotonic() - started
                with lock:
                    done = {m: len(latencies[m]) for m in order}
                    failed = sum(len(f) for f in failures.values())
                print(f"  {time.monotonic() - started:5.0f} s: " + ", ".join(f"{m} {n}" for m, n in done.items())
                      + f", failed {failed}" + (f", server RSS {sum(samples[-1][1].values()) / 2**20:.0f} MiB"
                                                if samples else ""), flush=True)
            stop.wait(options.sample_every)

    watcher = threading.Thread(target=sampler, daemon=True)
    watcher.start()
    workers = [threading.Thread(target=client_loop, args=(i,)) for i in range(options.concurrency)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    stop.set()
    watcher.join()
    if options.server_pid is not None:
        samples.append((time.monotonic() - started, tree_rss(options.server_pid)))
    return summarise(options, latencies, failures, samples, time.monotonic() - started)


def summarise(options: SoakOptions, latencies: dict, failures: dict, samples: list, seconds: float) -> dict:
    models = {}
    for model in options.models:
        values = latencies.get(model, [])
        models[model] = {"requests": len(values) + len(failures.get(model, [])), "failed": len(failures.get(model, [])),
                         "p50_ms": round(percentile(values, 50) * 1000, 1),
                         "p99_ms": round(percentile(values, 99) * 1000, 1),
                         "max_ms": round(max(values, default=float("nan")) * 1000, 1),
                         "per_second": round(len(values) / seconds, 2),
                         "first_failures": failures.get(model, [])[:5]}
    memory = None
    if samples:
        warm = min(60.0, options.seconds / 10)
        baseline = next((s for s in samples if s[0] >= warm), samples[0])
        final = samples[-1]
        memory = {"warm_up_s": round(baseline[0], 1),
                  "after_warm_up_mib": round(sum(baseline[1].values()) / 2 ** 20, 1),
                  "end_mib": round(sum(final[1].values()) / 2 ** 20, 1),
                  "growth_mib": round((sum(final[1].values()) - sum(baseline[1].values())) / 2 ** 20, 1),
                  "peak_mib": round(max(sum(s[1].values()) for s in samples) / 2 ** 20, 1),
                  "by_process_growth_mib": {name: round((final[1].get(name, 0) - baseline[1].get(name, 0)) / 2 ** 20, 1)
                                            for name in sorted(set(final[1]) | set(baseline[1]))}}
    failed = sum(m["failed"] for m in models.values())
    return {"seconds": round(seconds, 1), "concurrency": options.concurrency, "models": models,
            "failed": failed, "server_memory": memory, "ok": failed == 0}


def print_summary(result: dict) -> None:
    print(f"\nsoak: {result['seconds']:.0f} s at concurrency {result['concurrency']}")
    print(f"{'model':<10}{'requests':>10}{'failed':>8}{'per s':>8}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for model, m in result["models"].items():
        print(f"{model:<10}{m['requests']:>10}{m['failed']:>8}{m['per_second']:>8}{m['p50_ms']:>10}{m['p99_ms']:>10}"
              f"{m['max_ms']:>10}")
        for failure in m["first_failures"]:
            print(f"    {failure}")
    memory = result["server_memory"]
    if memory:
        print(f"server RSS (tritonserver + stubs): {memory['after_warm_up_mib']} MiB after {memory['warm_up_s']} s "
              f"warm-up -> {memory['end_mib']} MiB at the end (growth {memory['growth_mib']:+} MiB, peak "
              f"{memory['peak_mib']} MiB)")
        print("  by process: " + ", ".join(f"{k} {v:+}" for k, v in memory["by_process_growth_mib"].items()))
    print("OK: no failed request" if result["ok"] else f"NOT OK: {result['failed']} failed requests")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=SoakOptions.seconds, help="default 600 (env SOAK_SECONDS "
                        "through make)")
    parser.add_argument("--concurrency", type=int, default=SoakOptions.concurrency)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--url", help="gRPC address of a loopback server already running (default: start one)")
    parser.add_argument("--server-pid", type=int, help="with --url: its PID, for the memory figures")
    parser.add_argument("--repository", type=Path, help="exported repository to serve (default: the perf "
                        "suite's CPU export in perf/results/repository-cpu)")
    parser.add_argument("--out", type=Path, default=ROOT / "perf" / "results" / "soak")
    args = parser.parse_args(argv)
    options = SoakOptions(seconds=args.seconds, concurrency=args.concurrency,
                          models=tuple(m for m in args.models.split(",") if m))
    with serving(args.url, None, args.repository, args.out / "server") as (grpc, _, pid):
        options.url, options.server_pid = grpc, pid if pid is not None else args.server_pid
        print(f"soak: {options.seconds:g} s, concurrency {options.concurrency}, models {', '.join(options.models)}",
              flush=True)
        result = run(options)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(result, indent=2))
    print_summary(result)
    print(f"summary: {args.out / 'summary.json'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
