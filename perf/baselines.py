"""The reference libraries called in-process, sequentially, on the suite's inputs and the served weights.

Each baseline loads what the served model loads (the repository's `model.onnx`, whisper checkpoint or
EasyOCR weights), warms up once, then calls the library the way its users do, one input at a time, in
passes over the input set until `min_seconds` have passed. The served figures are reported as ratios to these.
"""
from __future__ import annotations

import json
import re
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .inputs import InputSet, Manifest


@dataclass
class Baseline:
    model: str
    input_set: str
    library: str  # e.g. "ultralytics YOLO.predict (onnxruntime, cpu)"
    calls: int
    throughput: float  # calls per second
    avg_ms: float
    p50_ms: float
    p99_ms: float


def measure(call: Callable[[object], object], items: list, min_seconds: float, max_calls: int) -> list[float]:
    """Latencies (s) of `call` over `items` in turn, after one warm-up call, for at least one pass."""
    call(items[0])
    latencies: list[float] = []
    start = time.perf_counter()
    while len(latencies) < len(items) or (time.perf_counter() - start < min_seconds and len(latencies) < max_calls):
        item = items[len(latencies) % len(items)]
        t = time.perf_counter()
        call(item)
        latencies.append(time.perf_counter() - t)
    return latencies


def summarise(model: str, input_set: str, library: str, latencies: list[float]) -> Baseline:
    ordered = sorted(latencies)
    return Baseline(model, input_set, library, len(latencies), len(latencies) / sum(latencies),
                    1000 * statistics.fmean(latencies), 1000 * ordered[len(ordered) // 2],
                    1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))])


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def yolo_predict(repository: Path, input_set: InputSet, files: list[Path], min_seconds: float,
                 max_calls: int) -> tuple[str, list[float]]:
    """ultralytics `YOLO.predict(path)` with its defaults (rect letterbox) on the weights `detect` serves.

    On CPU the very `model.onnx` of the repository (the local server's yolov8 runs it with onnxruntime); on a
    GPU the exported checkpoint in PyTorch fp16 (ultralytics' fastest plain path there). The defaults are what
    a user runs, and what `detect` returns in its default rect mode (the parity tests compare them so).
    """
    from ultralytics import YOLO

    dev = device()
    if dev == "cuda":
        weights = json.loads((repository / "export.json").read_text())["yolov8"]["weights"]
        model, kwargs, library = YOLO(weights, task="detect"), {"device": 0, "half": True}, "PyTorch fp16, cuda"
    else:
        model = YOLO(str(repository / "yolov8" / "1" / "model.onnx"), task="detect")
        kwargs, library = {"device": "cpu"}, "onnxruntime, cpu"
    latencies = measure(lambda f: model.predict(str(f), verbose=False, **kwargs), files, min_seconds, max_calls)
    return f"ultralytics YOLO.predict ({library})", latencies


def network_run(repository: Path, input_set: InputSet, files: list[Path], min_seconds: float,
                max_calls: int) -> tuple[str, list[float]]:
    """The raw network on one letterboxed image at a time (the input set's letterbox mode): onnxruntime `run`
    on the repository's `model.onnx` on CPU (what the python flavour serves); on a GPU the exported
    checkpoint's PyTorch module in fp16."""
    from .inputs import letterboxed

    tensors = [letterboxed(f.read_bytes(), input_set.letterbox)[None] for f in files]
    if device() == "cuda":
        import torch
        from ultralytics import YOLO

        weights = json.loads((repository / "export.json").read_text())["yolov8"]["weights"]
        model = YOLO(weights, task="detect").model.fuse().eval().half().cuda()
        batches = [torch.from_numpy(t).cuda().half() for t in tensors]

        def forward(x):
            with torch.inference_mode():
                model(x)
            torch.cuda.synchronize()

        return "PyTorch DetectionModel forward (batch 1, fp16, cuda)", measure(forward, batches, min_seconds,
                                                                               max_calls)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(repository / "yolov8" / "1" / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    latencies = measure(lambda x: session.run(["output0"], {"images": x}), tensors, min_seconds, max_calls)
    return "onnxruntime InferenceSession.run (batch 1, cpu)", latencies


def whisper_checkpoint(repository: Path) -> Path:
    """The checkpoint the served model loads (its config's `checkpoint` parameter)."""
    config = (repository / "whisper" / "config.pbtxt").read_text()
    name = re.search(r'key:\s*"checkpoint"\s*value:?\s*\{\s*string_value:\s*"([^"]+)"', config).group(1)
    return repository / "whisper" / "1" / name


def whisper_transcribe(repository: Path, input_set: InputSet, files: list[Path], min_seconds: float,
                       max_calls: int) -> tuple[str, list[float]]:
    """`whisper.transcribe(model, audio, temperature=0, condition_on_previous_text=False)`, as served greedily.

    Audio is decoded before timing (the served model decodes inside its timed request): a small favour to
    the baseline, < 1 % of a transcription.
    """
    import whisper

    from trident_serving.audio import decode_audio

    dev = device()
    model = whisper.load_model(str(whisper_checkpoint(repository)), device=dev)
    audios = [decode_audio(f.read_bytes()) for f in files]
    latencies = measure(lambda a: whisper.transcribe(model, a, temperature=0.0, condition_on_previous_text=False,
                                                     fp16=dev == "cuda"), audios, min_seconds, max_calls)
    return f"whisper.transcribe (greedy, {'fp16' if dev == 'cuda' else 'fp32'}, {dev})", latencies


def easyocr_readtext(repository: Path, input_set: InputSet, files: list[Path], min_seconds: float,
                     max_calls: int) -> tuple[str, list[float]]:
    """`Reader.readtext(path)` with a Reader built from the served weights exactly as the model builds it."""
    from trident_serving.ocr import load_reader

    # readtext's DataLoader asks for pinned memory on every call: one warning per page on a CPU
    warnings.filterwarnings("ignore", message=".*'pin_memory' argument is set as true", category=UserWarning)
    dev = device()
    reader = load_reader(repository / "easyocr" / "1" / "weights", dev)
    latencies = measure(lambda f: reader.readtext(str(f)), files, min_seconds, max_calls)
    return f"easyocr Reader.readtext ({dev})", latencies


BASELINES = {"detect": yolo_predict, "yolov8": network_run, "whisper": whisper_transcribe, "easyocr": easyocr_readtext}


def run(model: str, input_set: InputSet, manifest: Manifest, repository: Path, min_seconds: float = 10.0,
        max_calls: int = 200) -> Baseline:
    """Measure the baseline of `model` on `input_set`."""
    files = [manifest.path(f) for f in input_set.files]
    library, latencies = BASELINES[model](Path(repository), input_set, files, min_seconds, max_calls)
    return summarise(model, input_set.name, library, latencies)
