"""Whisper's two engines side by side on the same real weights (Whisper base, `--weights base-offline`).

    python -m perf.engines [--out perf/results/engines] [--concurrency 1 4] [--sets speech-5s speech-30s speech-2min]
                           [--served openai ctranslate2-float32 ctranslate2-int8] [--no-in-process]

Served, one server at a time on this machine, each serving only `whisper` on a CPU instance: the openai engine
(openai-whisper in PyTorch, fp32), the ctranslate2 engine at float32 and at int8. perf_analyzer sends the suite's
real-speech clips (perf.inputs: 5 s, 30 s, 2 min; greedy, TEMPERATURE [0]) at each concurrency. In process, on
the same clips and weights: faster-whisper (`transcribe(beam_size=1, temperature=0,
condition_on_previous_text=False, vad_filter=False)`, int8 and float32; at concurrency 4 four threads share one
model with four workers) and `whisper.transcribe` (greedy; concurrency 1 only: its decoding installs hooks on the
shared model's modules, so threads cannot share a model). Accuracy: each served engine's word error rate on the
real English clips of the tests (tests/data/real_speech.json) and the Korean clip's character error rate.
Throughput is audio seconds transcribed per wall second; everything runs in one process tree, in turn, so the
ratios compare like with like.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from trident_serving import server

from . import analyzer, baselines, inputs

ROOT = Path(__file__).resolve().parent.parent
SERVED = {"openai": ("openai", None), "ctranslate2-float32": ("ctranslate2", "float32"),
          "ctranslate2-int8": ("ctranslate2", "int8")}
SETS = ("speech-5s", "speech-30s", "speech-2min")


def export(repository: Path, engine: str, compute_type: str | None) -> None:
    args = ["whisper", "--weights", "base-offline", "--kind", "cpu", "--engine", engine]
    if compute_type:
        args += ["--compute-type", compute_type]
    subprocess.run([sys.executable, "-m", "export", *args, "--repo", str(repository)], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)


def served(name: str, options: server.ServerOptions, manifest: inputs.Manifest, sets: list[str],
           concurrencies: list[int], work: Path) -> list[dict]:
    """perf_analyzer on the running server: one row per input set and concurrency."""
    rows = []
    for set_name in sets:
        input_set = manifest.sets[set_name]
        for concurrency in concurrencies:
            measurement = analyzer.Measurement(
                "whisper", manifest.folder / input_set.input_data, concurrency,
                # windows of 4 requests per client thread: the clips differ in length and language (English
                # first, or Korean first), and windows of 2 per thread did not settle within 50 % at c4
                url=f"127.0.0.1:{options.grpc_port}", metrics_url=None, request_count=4 * concurrency,
                stability_percent=50.0, max_trials=5, timeout_s=1800)
            row = analyzer.run(measurement, work / name / set_name)
            rows.append(row_of(name, set_name, concurrency, input_set.units_per_request,
                               row["throughput"], row["p50_ms"] / 1000))
            print(rows[-1], flush=True)
    return rows


def row_of(engine: str, set_name: str, concurrency: int, seconds: float, requests_per_s: float,
           p50_s: float) -> dict:
    return {"engine": engine, "set": set_name, "concurrency": concurrency, "requests_per_s": round(requests_per_s, 3),
            "audio_s_per_s": round(requests_per_s * seconds, 2), "p50_s": round(p50_s, 2)}


def accuracy(options: server.ServerOptions) -> dict:
    """Word error rate over the real English clips, character error rate on the Korean one (greedy)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from real_speech import TRUTH, english_words, error_rate, language_of, load_clip
    from test_whisper_real import korean_chars

    from trident import Client

    client = Client(f"127.0.0.1:{options.grpc_port}", timeout=600)
    texts = {name: client.transcribe(load_clip(name), language=language_of(name), temperature=0).text
             for name in TRUTH}
    english = [n for n in TRUTH if TRUTH[n]["language"] == "en"]
    korean = [n for n in TRUTH if TRUTH[n]["language"] == "ko"]
    return {"english_wer": round(error_rate([(english_words(TRUTH[n]["text"]), english_words(texts[n]))
                                             for n in english]), 3),
            "korean_cer": round(error_rate([(korean_chars(TRUTH[n]["text"]), korean_chars(texts[n]))
                                            for n in korean]), 3)}


def in_process(manifest: inputs.Manifest, sets: list[str], concurrencies: list[int], repository: Path) -> list[dict]:
    """faster-whisper (int8, float32) and whisper.transcribe on the same clips and weights."""
    from faster_whisper import WhisperModel

    from export.whisper import offline_base_dir
    from trident_serving.audio import decode_audio

    rows = []
    for set_name in sets:
        input_set = manifest.sets[set_name]
        audios = [decode_audio((manifest.folder / f).read_bytes()) for f in input_set.files]
        for compute_type in ("int8", "float32"):
            for concurrency in concurrencies:
                model = WhisperModel(str(offline_base_dir()), device="cpu", compute_type=compute_type,
                                     num_workers=concurrency)

                def call(audio, model=model):
                    segments, _ = model.transcribe(audio, beam_size=1, temperature=0.0,
                                                   condition_on_previous_text=False, vad_filter=False)
                    return list(segments)

                rate, p50 = threaded(call, audios, concurrency)
                rows.append(row_of(f"faster-whisper {compute_type} (in process)", set_name, concurrency,
                                   input_set.units_per_request, rate, p50))
                print(rows[-1], flush=True)
        _, latencies = baselines.whisper_transcribe(repository, input_set, [manifest.folder / f for f in input_set.files],
                                                    min_seconds=0, max_calls=len(input_set.files))
        summary = baselines.summarise("whisper", set_name, "whisper.transcribe", latencies)
        rows.append(row_of("whisper.transcribe fp32 (in process)", set_name, 1, input_set.units_per_request,
                           summary.throughput, summary.p50_ms / 1000))
        print(rows[-1], flush=True)
    return rows


def threaded(call, items: list, concurrency: int) -> tuple[float, float]:
    """`concurrency` threads calling `call` on `items` in turn, 2 x concurrency calls after a warm-up:
    (calls per second, median latency in s)."""
    call(items[0])
    jobs = [items[i % len(items)] for i in range(2 * concurrency)]
    latencies: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not jobs:
                    return
                item = jobs.pop()
            start = time.perf_counter()
            call(item)
            with lock:
                latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return len(latencies) / wall, sorted(latencies)[len(latencies) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "perf" / "results" / "engines")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--served", nargs="*", default=list(SERVED), choices=SERVED, help="served engines to run")
    parser.add_argument("--in-process", action=argparse.BooleanOptionalAction, default=True,
                        help="also faster-whisper and whisper.transcribe in process (default: yes)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="trident-engines-") as tmp:
        work = Path(tmp)
        manifest = inputs.generate(work / "inputs")
        rows, accuracies = [], {}
        for engine, compute_type in (SERVED[name] for name in args.served):
            name = f"served {engine}" + (f" {compute_type}" if compute_type else " fp32")
            repository = work / name.replace(" ", "-")
            export(repository, engine, compute_type)
            options = server.on_free_ports(repository=repository, run_dir=work / f"run-{repository.name}",
                                           ready_timeout=600)
            server.start(options)
            try:
                rows += served(name, options, manifest, args.sets, args.concurrency, work)
                accuracies[name] = accuracy(options)
                print(name, accuracies[name], flush=True)
            finally:
                server.stop(options)
        if args.in_process:
            openai = work / "served-openai-fp32"  # whisper.transcribe loads its checkpoint
            if not openai.exists():
                export(openai, "openai", None)
            rows += in_process(manifest, args.sets, args.concurrency, openai)
    report = {"rows": rows, "accuracy": accuracies}
    (args.out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))
    (args.out / "report.md").write_text(table(report) + "\n")
    return 0


def table(report: dict) -> str:
    """Markdown: audio seconds per second (and p50 latency) by engine, clip and concurrency; accuracy."""
    columns = sorted({(r["set"], r["concurrency"]) for r in report["rows"]},
                     key=lambda k: (SETS.index(k[0]), k[1]))
    engines = list(dict.fromkeys(r["engine"] for r in report["rows"]))
    cell = {(r["engine"], r["set"], r["concurrency"]): r for r in report["rows"]}
    lines = ["| engine | " + " | ".join(f"{s.removeprefix('speech-')} c{c}" for s, c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for engine in engines:
        values = [cell.get((engine, s, c)) for s, c in columns]
        lines.append(f"| {engine} | " + " | ".join(f"{v['audio_s_per_s']} ({v['p50_s']} s)" if v else "-"
                                                   for v in values) + " |")
    lines += ["", "| served engine | English WER | Korean CER |", "|---|---|---|"]
    lines += [f"| {name} | {a['english_wer']} | {a['korean_cer']} |" for name, a in report["accuracy"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
