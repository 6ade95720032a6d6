"""Throughput of the served `whisper` model against `whisper.transcribe`, on the same clips and weights.

    python perf/bench_whisper.py --clips 16                   # server already running on localhost
    python perf/bench_whisper.py --start --repository model_repository

Rows: whisper.transcribe(condition_on_previous_text=False) called sequentially in this process on the
repository's checkpoint (fp16 on CUDA, fp32 on CPU, as the served model), then the served model over gRPC
at concurrency 1 and 16, each request a WAV file. The figure is audio seconds transcribed per wall second.
Clips are 5-90 s (--seconds) mixes of the committed espeak-ng sentences and silence: one to three windows.
Texts are compared with transcribe's: windows that fall back to T > 0 sample at random, so with weights
that often fall back (random ones always do) some texts differ legitimately.
"""
from __future__ import annotations

import argparse
import io
import re
import sys
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
SAMPLE_RATE = 16000


@dataclass
class Options:
    url: str = "localhost:8001"
    repository: Path = ROOT / "model_repository"
    clips: int = 16
    seconds: tuple[float, float] = (5.0, 90.0)  # clip lengths are drawn uniformly from this range
    concurrency: tuple[int, ...] = (1, 16)
    device: str = "auto"
    start: bool = False
    seed: int = 0


def make_clips(count: int, seconds: tuple[float, float], seed: int) -> list[bytes]:
    """`count` WAV files of random lengths: speech sentences (English, Korean) separated by random silences."""
    from trident_serving.audio import decode_audio

    sentences = [decode_audio(p.read_bytes()) for p in sorted(DATA.glob("speech_*.wav"))]
    rng = np.random.default_rng(seed)
    clips = []
    for _ in range(count):
        target, parts = rng.uniform(*seconds) * SAMPLE_RATE, []
        while sum(map(len, parts)) < target:
            parts += [sentences[rng.integers(len(sentences))], np.zeros(int(rng.uniform(0, 8) * SAMPLE_RATE))]
        audio = np.concatenate(parts)[: int(target)]
        out = io.BytesIO()
        with wave.open(out, "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(SAMPLE_RATE)
            w.writeframes((audio * 32767).astype("<i2").tobytes())
        clips.append(out.getvalue())
    return clips


def checkpoint(repository: Path) -> Path:
    """The checkpoint the served model loads (its config's `checkpoint` parameter)."""
    config = (repository / "whisper" / "config.pbtxt").read_text()
    name = re.search(r'key:\s*"checkpoint"\s*value:?\s*\{\s*string_value:\s*"([^"]+)"', config).group(1)
    return repository / "whisper" / "1" / name


def run_transcribe(path: Path, device: str, clips: list[bytes]) -> tuple[float, list[str]]:
    import whisper

    from trident_serving.audio import decode_audio

    model = whisper.load_model(str(path), device=device)
    audios = [decode_audio(c) for c in clips]

    def transcribe(audio):
        return whisper.transcribe(model, audio, condition_on_previous_text=False, fp16=device == "cuda")["text"]

    transcribe(audios[0][:SAMPLE_RATE])  # warm-up, as the served model does at load
    start = time.perf_counter()
    texts = [transcribe(a) for a in audios]
    return time.perf_counter() - start, texts


def serve_request(client, data: bytes) -> str:
    import tritonclient.grpc as grpcclient

    audio = grpcclient.InferInput("AUDIO", [1, 1], "BYTES")
    audio.set_data_from_numpy(np.array([[data]], dtype=np.object_))
    result = client.infer("whisper", [audio], client_timeout=3600)
    return result.as_numpy("TEXT")[0, 0].decode("utf-8")


def run_served(url: str, clips: list[bytes], concurrency: int) -> tuple[float, list[str]]:
    """Seconds to serve all clips with `concurrency` requests in flight (one client per thread), and texts."""
    import tritonclient.grpc as grpcclient

    clients = [grpcclient.InferenceServerClient(url) for _ in range(concurrency)]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        texts = list(pool.map(lambda i: serve_request(clients[i % concurrency], clips[i]), range(len(clips))))
    return time.perf_counter() - start, texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Options()
    parser.add_argument("--url", default=defaults.url, help="gRPC address of the server")
    parser.add_argument("--repository", type=Path, default=defaults.repository,
                        help="model repository the server uses (transcribe loads the same checkpoint)")
    parser.add_argument("--clips", type=int, default=defaults.clips)
    parser.add_argument("--seconds", type=float, nargs=2, default=list(defaults.seconds), metavar=("MIN", "MAX"),
                        help="range of clip lengths in seconds")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(defaults.concurrency))
    parser.add_argument("--device", default=defaults.device, help="device of in-process transcribe (auto: cuda if any)")
    parser.add_argument("--start", action="store_true", help="start a server on --repository for the run, then stop it")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    options = Options(args.url, args.repository, args.clips, tuple(args.seconds), tuple(args.concurrency),
                      args.device, args.start, args.seed)

    import torch

    device = options.device if options.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    clips = make_clips(options.clips, options.seconds, options.seed)
    audio_seconds = sum((len(c) - 44) / 2 / SAMPLE_RATE for c in clips)

    print(f"\n{options.clips} clips, {audio_seconds:.0f} s of audio in all ({checkpoint(options.repository).name})\n")
    print(f"{'mode':<42} {'seconds':>8} {'audio s/s':>10}  results vs transcribe", flush=True)

    def row(name: str, seconds: float, check: str) -> None:
        print(f"{name:<42} {seconds:8.2f} {audio_seconds / seconds:10.1f}  {check}", flush=True)

    server_options = None
    if options.start:
        from trident_serving import server

        port = int(options.url.rsplit(":", 1)[1])
        server_options = server.ServerOptions(repository=options.repository, grpc_port=port)
        server.start(server_options)
    try:
        seconds, reference = run_transcribe(checkpoint(options.repository), device, clips)
        row(f"whisper.transcribe, sequential ({device})", seconds, "reference")
        for concurrency in options.concurrency:
            seconds, texts = run_served(options.url, clips, concurrency)
            equal = sum(a == b for a, b in zip(texts, reference))
            row(f"served whisper, concurrency {concurrency}", seconds, f"{equal}/{len(clips)} texts equal")
    finally:
        if server_options is not None:
            server.stop(server_options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
