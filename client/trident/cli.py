"""`trident`: command line over the client. Run `trident --help`."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

from .client import Client
from .errors import TridentError
from .results import DetectResult, TextLine, Transcription


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trident", description="Call the Trident models on a Triton server.")
    parser.add_argument("--url", default=os.environ.get("TRIDENT_URL", "localhost"),
                        help="server address, host[:port] (env TRIDENT_URL; default localhost)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default=os.environ.get("TRIDENT_PROTOCOL"),
                        help="default: from the URL scheme, else grpc")
    parser.add_argument("--timeout", type=float,
                        help="seconds per request (default 120; for analyze 3600: a whole soundtrack is one request)")
    tls = parser.add_argument_group("TLS (gRPC)", "health: a restricted model-repository API's key is read from "
                                    "$TRIDENT_ADMIN_KEY")
    tls.add_argument("--ssl", action="store_true",
                     help="connect over TLS (implied by the options below)")
    tls.add_argument("--root-cert", default=os.environ.get("TRIDENT_ROOT_CERT"), metavar="PEM",
                     help="CA certificate that signed the server's (env TRIDENT_ROOT_CERT; default: system roots)")
    tls.add_argument("--client-cert", default=os.environ.get("TRIDENT_CLIENT_CERT"), metavar="PEM",
                     help="this client's certificate chain, for mutual TLS (env TRIDENT_CLIENT_CERT)")
    tls.add_argument("--client-key", default=os.environ.get("TRIDENT_CLIENT_KEY"), metavar="PEM",
                     help="its private key (env TRIDENT_CLIENT_KEY)")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("health", help="server liveness/readiness and model states (exit 1 unless all ready)")

    detect = commands.add_parser("detect", help="detect objects in images (YOLOv8)")
    detect.add_argument("images", nargs="+", metavar="IMAGE")
    detect.add_argument("--conf", type=float, help="confidence threshold (server default 0.25)")
    detect.add_argument("--iou", type=float, help="NMS IoU threshold (server default 0.7)")
    detect.add_argument("--json", action="store_true", help="print JSON lines")

    transcribe = commands.add_parser("transcribe", help="transcribe speech (Whisper)")
    transcribe.add_argument("files", nargs="+", metavar="FILE")
    transcribe.add_argument("--language", help="ISO code such as en or ko (default: detect)")
    transcribe.add_argument("--task", choices=("transcribe", "translate"), default="transcribe")
    transcribe.add_argument("--temperature", type=_floats, metavar="T[,T...]",
                            help="temperatures tried in turn on failing windows (server default 0,0.2,...,1); "
                                 "0 alone: greedy")
    transcribe.add_argument("--words", action="store_true",
                            help="also time each word (whisper's word timestamps): listed, or in --json")
    style = transcribe.add_mutually_exclusive_group()
    style.add_argument("--json", action="store_true", help="print JSON lines")
    style.add_argument("--srt", action="store_true", help="print SubRip subtitles")

    ocr = commands.add_parser("ocr", help="read Korean and English text in images (EasyOCR)")
    ocr.add_argument("images", nargs="+", metavar="IMAGE")
    ocr.add_argument("--json", action="store_true", help="print JSON lines")

    analyze = commands.add_parser(
        "analyze", help="analyse videos, audio and images (or folders of them): transcript with timed words, "
                        "objects and on-screen text per frame, written as analysis.json, SRT/WebVTT and report.html")
    analyze.add_argument("media", nargs="+", metavar="MEDIA")
    sampling = analyze.add_mutually_exclusive_group()
    sampling.add_argument("--fps", type=float, help="video frames analysed per second (default 1)")
    sampling.add_argument("--scenes", action="store_true",
                          help="one frame per scene instead: a scene starts where a 64x36 grey thumbnail of the "
                               "video, looked at once a second, changes by 30 grey levels on average")
    analyze.add_argument("--language", help="spoken language, ISO code such as en or ko (default: detect per file)")
    analyze.add_argument("--temperature", type=_floats, metavar="T[,T...]",
                         help="Whisper's temperatures, as for transcribe (0 alone: greedy, the same every run)")
    analyze.add_argument("--out", default="analysis", help="output folder (default ./analysis)")
    analyze.add_argument("--in-flight", type=int, default=16,
                         help="frames sent and not yet answered, at most (default 16)")
    analyze.add_argument("--quiet", action="store_true", help="no progress bars")

    stats = commands.add_parser("stats", help="per-model rates, batch sizes, latencies and GPU memory from the "
                                              "server's Prometheus metrics")
    stats.add_argument("--metrics-url", default=os.environ.get("TRIDENT_METRICS_URL"),
                       help="metrics endpoint (env TRIDENT_METRICS_URL; default: --url's host, port 8002)")
    stats.add_argument("--interval", type=float, default=2.0,
                       help="seconds between the two scrapes compared (default 2; 0: since the server started)")
    stats.add_argument("--watch", action="store_true", help="print again every interval until Ctrl-C")
    stats.add_argument("--json", action="store_true", help="print JSON lines")

    args = parser.parse_args(argv)
    if args.command == "stats":
        return _stats(args)
    if args.command == "analyze":
        return _analyze(args)
    try:
        client = Client(args.url, protocol=args.protocol, timeout=args.timeout or 120.0, **tls_options(args))
    except ValueError as exc:
        print(f"trident: {exc}", file=sys.stderr)
        return 2
    if args.command == "health":
        try:
            health = client.health()
        except TridentError as exc:
            print(f"trident: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(health, indent=2))
        # Red (exit 1) while any model cannot serve: Triton keeps a model whose stub died READY until the
        # supervisor unloads it, then reports it UNLOADING/LOADING (or UNAVAILABLE if the reload failed).
        down = sorted(f"{name} ({state or 'UNAVAILABLE'})" for name, state in health["models"].items()
                      if state != "READY")
        if down or not (health["live"] and health["ready"]):
            print("trident: not ready" + (": " + ", ".join(down) if down else ""), file=sys.stderr)
            return 1
        return 0
    if args.command == "detect":
        return _each(args.images, lambda p: client.detect(p, args.conf, args.iou), _show_detections, args.json)
    if args.command == "transcribe":
        show = _show_srt if args.srt else _show_transcription
        return _each(args.files, lambda p: client.transcribe(p, args.language, args.task, args.temperature,
                                                             word_timestamps=args.words), show, args.json)
    return _each(args.images, client.read_text, _show_lines, args.json)


def tls_options(args: argparse.Namespace) -> dict:
    """The Client's TLS arguments of the command line; --root-cert or a client certificate alone imply --ssl."""
    ssl = args.ssl or any((args.root_cert, args.client_cert, args.client_key))
    return {"ssl": ssl, "root_certificates": args.root_cert, "private_key": args.client_key,
            "certificate_chain": args.client_cert}


def _stats(args: argparse.Namespace) -> int:
    from . import stats  # needs prometheus_client, which the other commands do not

    url = args.metrics_url or stats.metrics_url(args.url)
    try:
        stats.run(url, args.interval, args.watch, args.json)
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"trident: cannot read metrics from {url}: {exc}", file=sys.stderr)
        return 1
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from .analyze import pipeline  # needs PyAV (trident[media]), which the other commands do not
    from .analyze.results import Options

    try:
        fps = None if args.scenes else (1.0 if args.fps is None else args.fps)
        options = Options(fps=fps, scenes=args.scenes, language=args.language, temperature=args.temperature)
        analysis = pipeline.analyze(args.media, args.url, args.protocol, options, out=args.out,
                                    in_flight=args.in_flight, timeout=args.timeout or 3600.0,
                                    progress=not args.quiet, client_options=tls_options(args))
    except ValueError as exc:
        print(f"trident: {exc}", file=sys.stderr)
        return 2
    except pipeline.ServerGone as exc:
        _print_summary(exc.analysis)
        print(f"trident: the server went away: {exc}; what was done is in {args.out}/", file=sys.stderr)
        return 1
    except TridentError as exc:
        print(f"trident: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"trident: interrupted; what was done is in {args.out}/", file=sys.stderr)
        return 130
    _print_summary(analysis)
    print(f"written to {args.out}/: analysis.json, report.html and subtitles", file=sys.stderr)
    return 1 if analysis.summary.failed else 0


def _print_summary(analysis) -> None:
    from .analyze.pipeline import summary_lines

    for line in summary_lines(analysis):
        print(line)


def _floats(text: str) -> list[float]:
    """'0,0.2,0.4' -> [0.0, 0.2, 0.4]."""
    return [float(part) for part in text.split(",") if part.strip()]


def _each(paths: list[str], call: Callable, show: Callable, as_json: bool) -> int:
    """Run `call` on each path; print results; report failures per file and exit 1 if any failed."""
    failed = 0
    for path in paths:
        try:
            result = call(path)
        except (TridentError, OSError) as exc:
            print(f"trident: {path}: {exc}", file=sys.stderr)
            failed += 1
            continue
        if as_json:
            body = [line.to_dict() for line in result] if isinstance(result, list) else result.to_dict()
            print(json.dumps({"file": path, "result": body}, ensure_ascii=False))
        else:
            show(path, result)
    return 1 if failed else 0


def _show_detections(path: str, result: DetectResult) -> None:
    print(f"{path}: {len(result)} detections")
    for d in result.detections:
        x1, y1, x2, y2 = d.box
        print(f"  {d.label:<16} {d.score:.3f}  [{x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f}]")


def _show_transcription(path: str, result: Transcription) -> None:
    print(f"{path} [{result.language}]: {result.text.strip()}")
    for word in (w for s in result.segments for w in s.words):
        print(f"  {word.start:8.2f} {word.end:8.2f}  {word.probability:.3f}  {word.word.strip()}")


def _show_srt(path: str, result: Transcription) -> None:
    print(result.to_srt())


def _show_lines(path: str, lines: list[TextLine]) -> None:
    print(f"{path}: {len(lines)} lines")
    for line in lines:
        print(f"  {line.score:.3f}  {line.text}")


def run() -> None:
    """The `trident` command. A reader that leaves early (`trident ... | head`) ends it quietly, as Python's
    documentation recommends: BrokenPipeError is caught here and SIGPIPE stays ignored. (With SIGPIPE at its
    default, a write to any closed pipe or socket, a library's included, killed the process: once an `analyze`
    being interrupted with Ctrl-C died so, with nothing written.)"""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # Python flushes stdout once more at exit: into /dev/null, so that this does not fail as well.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    run()
