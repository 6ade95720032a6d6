"""`python -m export {yolo,whisper,easyocr}`: write model artifacts into a Triton model repository;
`python -m export plan`: fit them on the GPUs."""
from __future__ import annotations

import argparse
import importlib
import sys

from .download import DownloadError
from .weights import WrongWeights

EXPORTERS = ("yolo", "whisper", "easyocr")
TOOLS = ("plan",)  # work on an exported repository


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in EXPORTERS + TOOLS:
        module = importlib.import_module(f"export.{name}")
        sub = commands.add_parser(name, help=module.__doc__.splitlines()[0])
        module.add_arguments(sub)
        sub.set_defaults(module=module)
    args = parser.parse_args(argv)
    try:
        args.module.run(args)
    except (DownloadError, WrongWeights) as exc:
        print(f"export {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
