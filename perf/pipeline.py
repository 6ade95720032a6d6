"""`python -m perf.pipeline`: how fast `trident analyze` turns video into results, and how much its three models
overlap.

    python -m perf.pipeline                          # cpu weights (as `python -m perf`), a server of its own
    python -m perf.pipeline --url 127.0.0.1:8001     # a server already running
    python -m perf.pipeline --fps 1 --minutes 2 --out perf/results/pipeline

Videos: the test video (tests/data/make_media.py: 20 s 720p H.264 with speech, photos, on-screen text) and a
longer one, that video repeated for `--minutes` (stream copy). For each, one `trident analyze` run (fixed-rate
sampling, greedy Whisper so that every run decodes the same tokens), then the same work served one request at
a time with nothing else running: Whisper on the extracted audio, then `detect` on each sampled frame, then
`easyocr` on each. Reported per video: media seconds, frames, the pipeline's wall time and realtime factor
(media seconds / wall), each model's share of the sequential time, and the overlap: the sequential sum of the
three models' served times divided by the pipeline's wall time (above 1: the models ran at the same time).
Writes results.json and report.md into --out.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.data import make_media
from trident import Client, media
from trident.inputs import encode_image
from trident.analyze import pipeline
from trident.analyze.results import Options

from . import __main__ as perf_main

ROOT = Path(__file__).resolve().parent.parent
GREEDY = [0.0]


@dataclass
class Measurement:
    video: str
    media_seconds: float
    frames: int
    wall_seconds: float
    realtime_factor: float
    sequential_seconds: dict[str, float]  # each model served alone, one request at a time

    @property
    def overlap(self) -> float:
        return sum(self.sequential_seconds.values()) / self.wall_seconds

    def shares(self) -> dict[str, float]:
        total = sum(self.sequential_seconds.values())
        return {model: seconds / total for model, seconds in self.sequential_seconds.items()}


def videos(directory: Path, minutes: float) -> list[Path]:
    """The test video, and that video repeated to last `minutes` (made once, reused)."""
    test_video = directory / "video.mp4"
    if not test_video.exists():
        make_media.build(directory)
    longer = directory / f"video-{minutes:g}min.mp4"
    if not longer.exists():
        repeats = max(1, round(minutes * 60 / make_media.DURATION))
        listing = directory / "repeat.txt"
        listing.write_text(f"file '{test_video.name}'\n" * repeats)
        subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "concat", "-safe", "0", "-i",
                        str(listing), "-c", "copy", "-movflags", "+faststart", str(longer)], check=True)
    return [test_video, longer]


def measure(video: Path, url: str, fps: float, in_flight: int, out: Path, progress: bool) -> Measurement:
    analysis = pipeline.analyze([video], url, options=Options(fps=fps, temperature=GREEDY), out=out / video.stem,
                                in_flight=in_flight, timeout=3600.0, progress=progress)
    found = analysis.inputs[0]
    if found.error:
        raise SystemExit(f"{video}: {found.error}")
    client = Client(url, timeout=3600.0)
    sequential = {}
    audio = media.extract_audio(video)
    start = time.perf_counter()
    client.transcribe(audio.data, temperature=GREEDY, word_timestamps=True)
    sequential["whisper"] = time.perf_counter() - start
    frames = [encode_image(sample.image) for sample in media.sample_frames(video, fps)]
    for model, call in (("detect", client.detect), ("easyocr", client.read_text)):
        start = time.perf_counter()
        for frame in frames:
            call(frame)
        sequential[model] = time.perf_counter() - start
    summary = analysis.summary
    return Measurement(video.name, summary.media_seconds, summary.frames, summary.wall_seconds,
                       summary.realtime_factor or 0.0, sequential)


def report(measurements: list[Measurement], fps: float, in_flight: int, machine: str) -> str:
    lines = [f"# `trident analyze` benchmark ({machine})", "",
             f"{fps:g} frame/s sampled, at most {in_flight} frames in flight, greedy Whisper with word timestamps.",
             "", "| video | media s | frames | wall s | realtime | whisper | detect | easyocr | overlap |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in measurements:
        shares = m.shares()
        lines.append(f"| {m.video} | {m.media_seconds:.0f} | {m.frames} | {m.wall_seconds:.1f} | "
                     f"{m.realtime_factor:.2f}x | " + " | ".join(
                         f"{m.sequential_seconds[k]:.1f} s ({shares[k]:.0%})" for k in ("whisper", "detect", "easyocr"))
                     + f" | {m.overlap:.2f} |")
    lines += ["", "whisper/detect/easyocr: each model's served time with the same inputs sent one request at a "
              "time (share of their sum); overlap: that sum / the pipeline's wall time."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="gRPC address of a running server (default: start one on the cpu weights)")
    parser.add_argument("--fps", type=float, default=1.0)
    parser.add_argument("--minutes", type=float, default=2.0, help="length of the longer video (default 2)")
    parser.add_argument("--in-flight", type=int, default=pipeline.IN_FLIGHT)
    parser.add_argument("--media", type=Path, default=ROOT / "perf" / "results" / "pipeline-media")
    parser.add_argument("--out", type=Path, default=ROOT / "perf" / "results" / "pipeline")
    parser.add_argument("--machine", default="this machine", help="named in the report")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    found = videos(args.media, args.minutes)
    server_options = None
    url = args.url
    if url is None:
        from trident_serving import server

        repository = ROOT / "perf" / "results" / "repository-cpu"
        print(f"exporting weights into {repository} ...", flush=True)
        perf_main.export(repository, "cpu", ("detect", "yolov8", "whisper", "easyocr"))
        server_options = server.on_free_ports(repository=repository, run_dir=args.out / "server", supervise=False)
        url = f"127.0.0.1:{server_options.grpc_port}"
        print("starting tritonserver ...", flush=True)
        server.start(server_options)
    try:
        measurements = [measure(video, url, args.fps, args.in_flight, args.out, not args.no_progress)
                        for video in found]
    finally:
        if server_options is not None:
            server.stop(server_options)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(
        [{**asdict(m), "overlap": m.overlap, "shares": m.shares()} for m in measurements], indent=1) + "\n")
    text = report(measurements, args.fps, args.in_flight, args.machine)
    (args.out / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
