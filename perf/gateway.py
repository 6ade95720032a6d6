"""The REST gateway's cost: `detect` through the gateway against direct gRPC, same server, same JPEGs, one run.

    python -m perf.gateway [--out perf/results/gateway] [--concurrency 1 8] [--seconds 20]

Direct: perf_analyzer (gRPC, closed loop) sending the suite's 640x480 JPEGs (perf.inputs jpeg-640x480) to
`detect`. Through the gateway: wrk (Debian's `wrk`, closed loop: one request per connection in flight) POSTing the
same JPEG bytes as raw bodies to /v1/detect of `python -m trident_gateway serve` (its own process, API keys on,
access log written), which calls the same server over gRPC. Each concurrency is measured direct then through the
gateway, back to back. Reported: requests per second, median latency, and the gateway's share of each
(throughput lost, milliseconds added at the median).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from trident_serving import server

from . import analyzer, inputs

ROOT = Path(__file__).resolve().parent.parent
SET = "jpeg-640x480"
LUA = """local files = {%s}
local bodies = {}
for i, path in ipairs(files) do
  local f = assert(io.open(path, "rb")); bodies[i] = f:read("*all"); f:close()
end
local n = 0
request = function()
  n = n %% #bodies + 1
  return wrk.format("POST", "/v1/detect", {["Content-Type"] = "image/jpeg", ["Authorization"] = "Bearer %s"},
                    bodies[n])
end
response = function(status, headers, body)
  if status ~= 200 then error("status " .. status .. ": " .. body) end
end
"""
UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def wrk(url: str, script: Path, concurrency: int, seconds: float) -> dict:
    """wrk's requests per second and median latency (s) at `concurrency` connections."""
    binary = shutil.which("wrk")
    if binary is None:
        raise SystemExit("wrk is needed: apt-get install wrk (make system-deps)")
    done = subprocess.run([binary, "-t", str(min(concurrency, 2)), "-c", str(concurrency), "-d", f"{seconds:.0f}s",
                           "--latency", "--timeout", "60s", "-s", str(script), url],
                          capture_output=True, text=True, timeout=seconds + 120)
    if done.returncode != 0 or "Requests/sec" not in done.stdout:
        raise RuntimeError(f"wrk failed:\n{done.stdout}{done.stderr}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", done.stdout)
    if errors or "error" in done.stderr.lower():
        raise RuntimeError(f"the gateway answered errors:\n{done.stdout}{done.stderr}")
    p50 = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s|m)\s*$", done.stdout, re.M)
    return {"requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", done.stdout).group(1)),
            "p50_s": float(p50.group(1)) * UNITS[p50.group(2)]}


def start_gateway(options: server.ServerOptions, keys: Path, work: Path) -> tuple[subprocess.Popen, int]:
    port = server.free_port()
    process = subprocess.Popen([sys.executable, "-m", "trident_gateway", "serve", "--triton",
                                f"127.0.0.1:{options.grpc_port}", "--port", str(port), "--keys", str(keys),
                                "--data-dir", str(work / "gateway-data"), "--log-level", "warning"],
                               stdout=open(work / "gateway-access.log", "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as response:
                if response.status == 200:
                    return process, port
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the gateway did not become ready: {(work / 'gateway-access.log').read_text()}")
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "perf" / "results" / "gateway")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each measurement")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    from trident_gateway import keys

    with tempfile.TemporaryDirectory(prefix="trident-gateway-perf-") as tmp:
        work = Path(tmp)
        manifest = inputs.generate(work / "inputs")
        input_set = manifest.sets[SET]
        repository = work / "repository"
        subprocess.run([sys.executable, "-m", "export", "yolo", "--weights", "synthetic", "--flavour", "python",
                        "--repo", str(repository)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        key = keys.create(work / "keys.json", "perf")
        script = work / "post.lua"
        script.write_text(LUA % (", ".join(json.dumps(str(manifest.folder / f)) for f in input_set.files), key))
        options = server.on_free_ports(repository=repository, run_dir=work / "run", ready_timeout=600)
        server.start(options)
        gateway = None
        try:
            gateway, port = start_gateway(options, work / "keys.json", work)
            rows = []
            for concurrency in args.concurrency:
                direct = analyzer.run(analyzer.Measurement(
                    "detect", manifest.folder / input_set.input_data, concurrency,
                    url=f"127.0.0.1:{options.grpc_port}", metrics_url=None,
                    interval_ms=int(args.seconds * 1000 / 3), stability_percent=20.0, max_trials=6), work / "pa")
                through = wrk(f"http://127.0.0.1:{port}/v1/detect", script, concurrency, args.seconds)
                rows.append({"concurrency": concurrency,
                             "direct_grpc": {"requests_per_s": round(direct["throughput"], 2),
                                             "p50_s": round(direct["p50_ms"] / 1000, 4)},
                             "gateway": {k: round(v, 4) for k, v in through.items()},
                             "throughput_loss": round(1 - through["requests_per_s"] / direct["throughput"], 3),
                             "p50_added_ms": round(1000 * through["p50_s"] - direct["p50_ms"], 1)})
                print(rows[-1], flush=True)
        finally:
            if gateway is not None:
                gateway.terminate()
                gateway.wait(30)
            server.stop(options)
    report = {"input_set": SET, "tools": {"direct": "perf_analyzer 2.51 (gRPC)", "gateway": "wrk 4.1 (HTTP/1.1)"},
              "machine": f"{os.cpu_count()} CPU cores, no GPU", "rows": rows}
    (args.out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = ["| concurrency | direct gRPC req/s | gateway req/s | throughput lost | direct p50 ms | gateway p50 ms "
             "| added p50 ms |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['concurrency']} | {r['direct_grpc']['requests_per_s']} | {r['gateway']['requests_per_s']} | "
              f"{100 * r['throughput_loss']:.1f} % | {1000 * r['direct_grpc']['p50_s']:.1f} | "
              f"{1000 * r['gateway']['p50_s']:.1f} | {r['p50_added_ms']} |" for r in rows]
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
