"""Cold start of the local server: time from start to READY, and each model's first request against the next ten.

    python deploy/cold_start.py --repository <exported repo> [--no-warmup]

--no-warmup serves a copy of the repository with every `model_warmup` removed, to show what warm-up costs at
start and saves on the first request. A benchmark, not a test: the numbers depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from trident import Client
from trident_serving import server

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"


def without_warmup(repository: Path, target: Path) -> Path:
    """A copy of `repository` whose configs have no model_warmup."""
    shutil.copytree(repository, target, symlinks=True)
    for path in target.glob("*/config.pbtxt"):
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        del config.model_warmup[:]
        path.write_text(text_format.MessageToString(config))
    return target


def requests(client: Client, models: set[str]) -> dict:
    """One callable per served end-to-end model, each sending a shipped sample."""
    from ultralytics.utils import ASSETS

    calls = {}
    if "detect" in models:
        calls["detect"] = lambda: client.detect(str(ASSETS / "bus.jpg"))
    if "whisper" in models:
        calls["whisper"] = lambda: client.transcribe(str(DATA / "speech_en.wav"), temperature=0.0)
    if "easyocr" in models:
        calls["easyocr"] = lambda: client.read_text(str(DATA / "ocr_en_sign.jpg"))
    return calls


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, required=True, help="an exported model repository")
    parser.add_argument("--no-warmup", action="store_true", help="serve a copy without model_warmup")
    parser.add_argument("--repeat", type=int, default=10, help="requests after the first (default 10)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="trident-cold-start-") as scratch:
        repository = args.repository.resolve()
        if args.no_warmup:
            repository = without_warmup(repository, Path(scratch) / "repository")
        options = server.on_free_ports(repository=repository, run_dir=Path(scratch) / "run", ready_timeout=900)
        start = time.perf_counter()
        server.start(options)
        ready = time.perf_counter() - start
        try:
            client = Client(f"127.0.0.1:{options.grpc_port}", protocol="grpc", timeout=600)
            models = {p.parent.name for p in repository.glob("*/config.pbtxt")}
            print(f"warm-up {'off' if args.no_warmup else 'on'}: server start -> all models ready {ready:.1f} s")
            for name, call in requests(client, models).items():
                first = timed(call)
                rest = [timed(call) for _ in range(args.repeat)]
                median = statistics.median(rest)
                print(f"  {name:8s} first request {first * 1000:8.0f} ms, median of next {args.repeat} "
                      f"{median * 1000:7.0f} ms, ratio {first / median:5.2f}")
        finally:
            server.stop(options)


if __name__ == "__main__":
    main()
