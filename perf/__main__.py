"""`python -m perf`: benchmark the served models with perf_analyzer, batching on and off, detect's rect and
square letterbox, against baselines.

    python -m perf                       # cpu mode (no GPU) or gpu mode: export, start a server, measure, report
    python -m perf --mode cpu --models detect,easyocr
    python -m perf --url 127.0.0.1:8001 --no-toggle --repository DIR   # a server already running

Without --url it exports the mode's weights into perf/results/repository-<cpu|gpu> (unless --repository names an
exported one; see `exports`), starts the local Triton server in explicit model-control mode on free ports, and
stops it at the end.
Writes results.csv, results.json, throughput.png, latency.png, server_split.png and report.md into --out.
A perf_analyzer failure stops the run with perf_analyzer's own message (exit status 1).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from . import analyzer, inputs, report, suite

ROOT = Path(__file__).resolve().parent.parent


def default_mode() -> str:
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def exports(mode: str) -> list[list[str]]:
    """`python -m export` arguments per mode.

    cpu: the real weights that install offline from the package index where they exist (Whisper base,
    EasyOCR English: realistic token counts and text boxes, hence realistic times) and YOLOv8n synthetic
    (the network costs the same whatever its weights). gpu: synthetic weights of the real sizes (Whisper
    small, EasyOCR ko+en), as nothing can be downloaded there.
    """
    if mode == "gpu":
        return [["yolo", "--size", "n", "--flavour", "python", "--kind", "gpu", "--weights", "synthetic"],
                ["whisper", "--size", "small", "--kind", "gpu", "--weights", "synthetic"],
                ["easyocr", "--kind", "gpu", "--weights", "synthetic"]]
    import easyocr_en_models

    return [["yolo", "--size", "n", "--flavour", "python", "--weights", "synthetic"],
            ["whisper", "--weights", "base-offline"],
            ["easyocr", "--lang", "en", "--weights", str(easyocr_en_models.model_dir())]]


def export(repository: Path, mode: str, models: tuple[str, ...]) -> None:
    """The weights of the models to measure into `repository` (converted and cached under ~/.cache/trident)."""
    wanted = {"yolo": {"detect", "yolov8"}, "whisper": {"whisper"}, "easyocr": {"easyocr"}}
    for args in exports(mode):
        if wanted[args[0]] & set(models):
            subprocess.run([sys.executable, "-m", "export", *args, "--repo", str(repository)],
                           cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m perf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("cpu", "gpu", "smoke"), default=None,
                        help="cpu: ~10 min on 2 cores; gpu: full sweep; smoke: seconds (default: gpu if CUDA)")
    parser.add_argument("--models", default=",".join(suite.MODELS), help="comma separated (default: all four)")
    parser.add_argument("--repository", type=Path, default=None,
                        help="an exported model repository (default: export the mode's weights into "
                        "perf/results/repository-<mode>)")
    parser.add_argument("--data", type=Path, default=inputs.DEFAULT_DIR, help="input files (generated if missing)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: perf/results/<mode>)")
    parser.add_argument("--url", default=None, help="gRPC address of a running server (default: start one)")
    parser.add_argument("--metrics-url", default=None, help="its metrics endpoint, e.g. 127.0.0.1:8002/metrics")
    parser.add_argument("--no-toggle", action="store_true",
                        help="measure the models as loaded (no explicit-mode load/unload; batching on only)")
    parser.add_argument("--batching", default=",".join(suite.VARIANTS),
                        help="variants to measure: on,off,square (default) or some of them; square: batching on "
                             "with detect's square letterbox (detect only)")
    parser.add_argument("--concurrency", default=None, help="comma separated levels (default: the mode's plan)")
    parser.add_argument("--input-set", action="append", default=[], metavar="MODEL=SET",
                        help="inputs for a model, e.g. whisper=speech-30s (see perf/data/manifest.json)")
    parser.add_argument("--no-baselines", action="store_true", help="skip the in-process baselines")
    parser.add_argument("--baseline-seconds", type=float, default=None)
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = args.mode or default_mode()
    models = tuple(m for m in args.models.split(",") if m)
    unknown = set(models) - set(suite.MODELS)
    if unknown:
        raise SystemExit(f"unknown models {sorted(unknown)}; choose from {', '.join(suite.MODELS)}")
    out = args.out or ROOT / "perf" / "results" / mode
    repository = args.repository
    if repository is None:
        if args.url:
            raise SystemExit("--url needs --repository (the baselines load the served weights from it)")
        repository = ROOT / "perf" / "results" / f"repository-{'gpu' if mode == 'gpu' else 'cpu'}"
        print(f"exporting weights into {repository} ...", flush=True)
        export(repository, "gpu" if mode == "gpu" else "cpu", models)
    variants = tuple(b for b in args.batching.split(",") if b)
    if not variants or set(variants) - set(suite.VARIANTS):
        raise SystemExit(f"--batching {args.batching}: choose from {','.join(suite.VARIANTS)}")
    manifest_file = args.data / "manifest.json"
    manifest = inputs.Manifest.load(args.data) if manifest_file.exists() else None
    planned = {name for table in suite.PLANS.values() for entries in table.values() for name, _ in entries}
    if manifest is None or planned - set(manifest.sets):  # none yet, or made before the plan's newer sets
        manifest = inputs.generate(args.data)

    options = suite.SuiteOptions(
        mode=mode, models=models, repository=repository, data=args.data, out=out,
        batching=variants, toggle=not args.no_toggle,
        concurrency=tuple(int(c) for c in args.concurrency.split(",")) if args.concurrency else None,
        input_sets=dict(item.split("=", 1) for item in args.input_set), baselines=not args.no_baselines)
    if args.baseline_seconds is not None:
        options.baseline_seconds = args.baseline_seconds
    elif mode in ("smoke", "gpu"):
        options.baseline_seconds = 1.0 if mode == "smoke" else 5.0
    notes = []
    if "whisper" in models and "off" in options.batching and not suite.whisper_off_supported(repository):
        notes.append("whisper's model does not read `max_windows_per_step` yet: its 'off' run only turns "
                     "Triton's dynamic batching off (the scheduler still batches the windows of queued requests)")
    if any(not manifest.sets[s].note.startswith("~20 lines, Korean") for s in manifest.sets if s.startswith("pages")):
        notes.append("OCR pages without Hangul: install Debian's fonts-nanum and delete perf/data to regenerate")

    server_options = None
    results: list = []
    found_baselines: list = []
    if args.url:
        options.url = args.url
        options.metrics_url = args.metrics_url
    else:
        from trident_serving import server

        server_options = server.on_free_ports(repository=repository, run_dir=out / "server",
                                              model_control="explicit" if options.toggle else "none",
                                              # a benchmark measures serving, not stub recovery
                                              supervise=False)
        options.url = f"127.0.0.1:{server_options.grpc_port}"
        options.metrics_url = f"127.0.0.1:{server_options.metrics_port}/metrics"
    try:
        if server_options is not None:
            print(f"starting tritonserver ({server_options.model_control} model control) ...", flush=True)
            server.start(server_options)
        suite.run(options, manifest, not args.no_progress, results, found_baselines)
    except analyzer.PerfAnalyzerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # keep what was measured: the report says it is partial
        notes.append(f"interrupted: partial results ({len(results)} measurements)")
        print("interrupted: writing the partial report", file=sys.stderr)
    finally:
        if server_options is not None:
            server.stop(server_options)
    paths = report.write(out, results, found_baselines, manifest, repository, mode, notes)
    print(f"report: {paths['report']}")
    table = report.rows(results, found_baselines, manifest)
    for key, g in report.gains(table).items():
        print(f"batching gain {key}: {g['gain']:.2f}x ({g['on']:.2f} vs {g['off']:.2f} req/s)")
    for key, g in report.gains(table, "square").items():
        print(f"rect / square letterbox {key}: {g['gain']:.2f}x ({g['on']:.2f} vs {g['square']:.2f} req/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
