"""`trident`: command line over the client. Run `trident --help`."""
from __future__ import annotations

import argparse
import json
import os
import signal
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
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("health", help="server liveness/readiness and model states")

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
    style = transcribe.add_mutually_exclusive_group()
    style.add_argument("--json", action="store_true", help="print JSON lines")
    style.add_argument("--srt", action="store_true", help="print SubRip subtitles")

    ocr = commands.add_parser("ocr", help="read Korean and English text in images (EasyOCR)")
    ocr.add_argument("images", nargs="+", metavar="IMAGE")
    ocr.add_argument("--json", action="store_true", help="print JSON lines")

    args = parser.parse_args(argv)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `trident ... | head` ends quietly
    client = Client(args.url, protocol=args.protocol, timeout=args.timeout)
    if args.command == "health":
        try:
            print(json.dumps(client.health(), indent=2))
        except TridentError as exc:
            print(f"trident: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.command == "detect":
        return _each(args.images, lambda p: client.detect(p, args.conf, args.iou), _show_detections, args.json)
    if args.command == "transcribe":
        show = _show_srt if args.srt else _show_transcription
        return _each(args.files, lambda p: client.transcribe(p, args.language, args.task, args.temperature), show, args.json)
    return _each(args.images, client.read_text, _show_lines, args.json)


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


def _show_srt(path: str, result: Transcription) -> None:
    print(result.to_srt())


def _show_lines(path: str, lines: list[TextLine]) -> None:
    print(f"{path}: {len(lines)} lines")
    for line in lines:
        print(f"  {line.score:.3f}  {line.text}")


if __name__ == "__main__":
    sys.exit(main())
