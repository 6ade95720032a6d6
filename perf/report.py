"""Results of a suite run as CSV + JSON, PNG plots and a Markdown report naming the machine and versions.

    python -m perf.report perf/results/gpu     # re-render the plots and report.md from results.json
                                               # (e.g. for a GPU machine's results, where matplotlib was missing)
"""
from __future__ import annotations

import csv
import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from .baselines import Baseline
from .inputs import Manifest
from .suite import SETTINGS, Result

PACKAGES = ("tritonclient", "nvidia-pytriton", "torch", "onnxruntime", "ultralytics", "openai-whisper", "easyocr",
            "numpy")
SPLIT = (("queue_ms", "queue"), ("compute_input_ms", "compute input"), ("compute_infer_ms", "compute infer"),
         ("compute_output_ms", "compute output"))


def environment(repository: Path) -> dict:
    """Machine, CPU, GPU, load, versions and weights: what a reader needs to judge the figures."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpus = []
    if shutil.which("nvidia-smi"):
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True)
        gpus = [g.strip() for g in done.stdout.splitlines() if g.strip()]
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["tritonserver"] = "2.51.0 (nvidia-pytriton 0.7.0 bundle)"
    versions["python"] = platform.python_version()
    weights = {}
    export = Path(repository) / "export.json"
    if export.exists():
        weights = json.loads(export.read_text())
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory_gib, 1),
            "gpus": gpus, "load_average": os.getloadavg(), "os": platform.platform(), "versions": versions,
            "weights": weights, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def rows(results: list[Result], found: list[Baseline], manifest: Manifest) -> list[dict]:
    """One row per served measurement, with its ratios to the in-process baseline of the same inputs."""
    by_set = {(b.model, b.input_set): b for b in found}
    out = []
    for result in results:
        row = result.row()
        input_set = manifest.sets[result.input_set]
        row["unit"] = input_set.unit
        row["units_per_s"] = row["throughput"] * input_set.units_per_request
        base = by_set.get((result.model, result.input_set))
        if base:
            row["baseline_throughput"] = base.throughput
            row["throughput_vs_baseline"] = row["throughput"] / base.throughput
            row["p50_vs_baseline"] = row["p50_ms"] / base.p50_ms
        out.append(row)
    return out


def gains(table: list[dict], other: str = "off") -> dict[str, dict]:
    """Per model and input set: best throughput with batching on / with the `other` variant (off: batching off;
    square: detect's square letterbox, against its default rect)."""
    out: dict[str, dict] = {}
    for key in dict.fromkeys((r["model"], r["input_set"]) for r in table):
        best = {b: max((r["throughput"] for r in table if (r["model"], r["input_set"]) == key and r["batching"] == b),
                       default=None) for b in ("on", other)}
        if best["on"] and best[other]:
            out[f"{key[0]} {key[1]}"] = {"on": best["on"], other: best[other], "gain": best["on"] / best[other]}
    return out


VARIANT_STYLES = (("on", "o-"), ("off", "s--"), ("square", "D-."))
VARIANT_LABELS = {"on": "batching on", "off": "batching off", "square": "square letterbox"}


def plot(table: list[dict], found: list[Baseline], folder: Path) -> list[Path]:
    """throughput.png, latency.png and server_split.png; one panel per (model, input set)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys((r["model"], r["input_set"]) for r in table))
    base = {(b.model, b.input_set): b for b in found}
    paths = []
    if not keys:
        return paths

    def panels(title: str):
        figure, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
        figure.suptitle(title)
        return figure, axes[0]

    def series(key, batching, column):
        points = sorted((r["concurrency"], r[column]) for r in table
                        if (r["model"], r["input_set"]) == key and r["batching"] == batching and column in r)
        return [p[0] for p in points], [p[1] for p in points]

    figure, axes = panels("Throughput vs concurrency (batching on / off, square letterbox; dotted: in-process "
                          "baseline)")
    for ax, key in zip(axes, keys):
        for batching, style in VARIANT_STYLES:
            x, y = series(key, batching, "throughput")
            if x:
                ax.plot(x, y, style, label=VARIANT_LABELS[batching])
        if key in base:
            ax.axhline(base[key].throughput, color="gray", linestyle=":", label="baseline")
        ax.set(title=f"{key[0]} · {key[1]}", xlabel="concurrency", ylabel="requests/s")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
    paths.append(_save(figure, folder / "throughput.png"))

    figure, axes = panels("Client latency vs concurrency (p50 / p95 / p99)")
    for ax, key in zip(axes, keys):
        for batching, style in VARIANT_STYLES:
            style = style[1:]  # the line style; the markers tell the percentiles apart
            for column, marker in (("p50_ms", "o"), ("p95_ms", "^"), ("p99_ms", "v")):
                x, y = series(key, batching, column)
                if x:
                    ax.plot(x, y, marker + style, label=f"{column[:3]} {batching}", markersize=4)
        ax.set(title=f"{key[0]} · {key[1]}", xlabel="concurrency", ylabel="ms")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=6, ncol=2)
    paths.append(_save(figure, folder / "latency.png"))

    figure, axes = panels("Server-side split per request (batching on | off)")
    for ax, key in zip(axes, keys):
        labels, bottoms = [], []
        entries = sorted((r for r in table if (r["model"], r["input_set"]) == key),
                         key=lambda r: (r["batching"] != "on", r["concurrency"]))
        for r in entries:
            labels.append(f"{r['batching']}\nc{r['concurrency']}")
        bottoms = [0.0] * len(entries)
        for column, name in SPLIT:
            heights = [r.get(column, 0.0) for r in entries]
            ax.bar(range(len(entries)), heights, bottom=bottoms, label=name)
            bottoms = [b + h for b, h in zip(bottoms, heights)]
        ax.set_xticks(range(len(entries)), labels, fontsize=7)
        ax.set(title=f"{key[0]} · {key[1]}", ylabel="ms per request")
        ax.legend(fontsize=7)
    paths.append(_save(figure, folder / "server_split.png"))
    return paths


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path


def markdown(env: dict, table: list[dict], found: list[Baseline], sets: dict[str, dict], mode: str,
             notes: list[str]) -> str:
    """The human-readable report."""
    gpu = "; ".join(env["gpus"]) or "none"
    lines = [f"# Trident benchmark ({mode} mode), {env['date']}", "",
             f"* machine: `{env['host']}`, {env['cpu']}, {env['cores']} cores, {env['memory_gib']} GiB RAM, "
             f"GPU: {gpu}",
             f"* load average at the end: {', '.join(f'{v:.1f}' for v in env['load_average'])} "
             f"(a load above the core count means other work shared the CPU: compare ratios, not absolutes)",
             "* versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
             "* weights: " + "; ".join(f"{k}: {_weights(v)}" for k, v in env["weights"].items()),
             "* perf_analyzer 2.51 over gRPC (`yolov8` with `--shared-memory system`), "
             f"{'count' if SETTINGS[mode][0] == 'count' else 'time'} windows, one "
             "concurrency level per run, one unmeasured warm-up request per model load; baselines: the reference "
             "library in-process, sequential, same inputs and weights, measured right before the model's served "
             "runs", ""]
    lines += [f"* note: {n}" for n in notes]
    lines += ["", "## Inputs", "", "| set | model | files | note |", "| --- | --- | --- | --- |"]
    used = dict.fromkeys(r["input_set"] for r in table)
    for name in used:
        s = sets[name]
        lines.append(f"| {name} | {s['model']} | {len(s['files'])} ({', '.join(s['files'][:3])}) | {s['note']} |")
    lines += ["", "## Baselines (in-process, sequential)", "",
              "| model | inputs | library | calls | req/s | p50 ms | p99 ms |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for b in found:
        lines.append(f"| {b.model} | {b.input_set} | {b.library} | {b.calls} | {b.throughput:.2f} | "
                     f"{b.p50_ms:.1f} | {b.p99_ms:.1f} |")
    lines += ["", "## Served (perf_analyzer)", "",
              "| model | inputs | batching | conc. | req/s | units/s | × baseline | p50 ms | p95 ms | p99 ms | "
              "p50 × baseline | queue ms | compute ms |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in table:
        compute = sum(r.get(c, 0.0) for c, _ in SPLIT[1:])
        lines.append(
            f"| {r['model']} | {r['input_set']} | {r['batching']} | {r['concurrency']} | {r['throughput']:.2f} | "
            f"{r['units_per_s']:.1f} {r['unit']}/s | {_ratio(r.get('throughput_vs_baseline'))} | "
            f"{r.get('p50_ms', 0):.0f} | {r.get('p95_ms', 0):.0f} | {r.get('p99_ms', 0):.0f} | "
            f"{_ratio(r.get('p50_vs_baseline'))} | {r.get('queue_ms', 0):.1f} | {compute:.1f} |")
    found_gains = gains(table)
    if found_gains:
        lines += ["", "## Batching gain (best throughput on / off, same instances)", "",
                  "| model · inputs | on req/s | off req/s | gain |", "| --- | --- | --- | --- |"]
        for key, g in found_gains.items():
            lines.append(f"| {key} | {g['on']:.2f} | {g['off']:.2f} | {g['gain']:.2f}× |")
    letterbox = gains(table, "square")
    if letterbox:
        lines += ["", "## Rect against square letterbox (best throughput, batching on, same instances)", "",
                  "| model · inputs | rect req/s | square req/s | rect ÷ square |", "| --- | --- | --- | --- |"]
        for key, g in letterbox.items():
            lines.append(f"| {key} | {g['on']:.2f} | {g['square']:.2f} | {g['gain']:.2f}× |")
    lines += ["", "## Plots", "", "![throughput](throughput.png)", "", "![latency](latency.png)", "",
              "![server split](server_split.png)", ""]
    return "\n".join(lines)


def _ratio(value) -> str:
    return f"{value:.2f}×" if value is not None else "–"


def _weights(entry) -> str:
    if not isinstance(entry, dict):
        return str(entry)
    if entry.get("synthetic"):
        kind = "synthetic (random)"
    elif entry.get("weights") == "official":
        kind = "official"
    elif entry.get("converted_from"):  # e.g. Whisper base from the offline packages
        kind = f"real (converted from CTranslate2 {Path(entry['converted_from']).name})"
    else:  # local files, e.g. EasyOCR English from the offline package
        kind = f"real ({'/'.join(Path(entry.get('weights', '')).parts[-2:])})"
    size = entry.get("size") or ",".join(entry.get("lang", []))
    return f"{size} {kind}".strip()


def write(folder: Path, results: list[Result], found: list[Baseline], manifest: Manifest, repository: Path,
          mode: str, notes: list[str] | None = None) -> dict[str, Path]:
    """Write results.csv, results.json, the plots and report.md into `folder`; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    env = environment(repository)
    table = rows(results, found, manifest)
    columns = list(dict.fromkeys(k for r in table for k in r))
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)
    sets = {name: asdict(manifest.sets[name]) for name in dict.fromkeys(r["input_set"] for r in table)}
    payload = {"mode": mode, "environment": env, "notes": notes or [], "results": table,
               "baselines": [asdict(b) for b in found], "batching_gain": gains(table),
               "letterbox_gain": gains(table, "square"), "input_sets": sets}
    (folder / "results.json").write_text(json.dumps(payload, indent=1, ensure_ascii=False))
    return {"csv": folder / "results.csv", "json": folder / "results.json", **render(folder)}


def render(folder: Path) -> dict[str, Path]:
    """The plots and report.md from `folder`/results.json; plots are skipped (with a note) without matplotlib."""
    payload = json.loads((folder / "results.json").read_text())
    table, found = payload["results"], [Baseline(**b) for b in payload["baselines"]]
    notes = list(payload["notes"])
    try:
        plots = plot(table, found, folder)
    except ImportError:
        plots = []
        notes.append("plots not drawn here (no matplotlib): run `python -m perf.report <this folder>` elsewhere")
    text = markdown(payload["environment"], table, found, payload["input_sets"], payload["mode"], notes)
    (folder / "report.md").write_text(text)
    return {"report": folder / "report.md", **{p.stem: p for p in plots}}


if __name__ == "__main__":
    for argument in sys.argv[1:] or ["-h"]:
        if argument in ("-h", "--help"):
            print(__doc__)
            continue
        print(render(Path(argument))["report"])
