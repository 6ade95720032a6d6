"""`python -m perf.fuzz`: mutated inputs against every model; the server must answer each one and stay up.

    python -m perf.fuzz -n 1000                  # export the CPU weights if needed, start a server, fuzz, stop
    python -m perf.fuzz -n 200 --url 127.0.0.1:8001 --http-url 127.0.0.1:8000   # a server already running

Every case is a valid input (committed test images and speech, generated images in every accepted format,
letterboxed tensors) mutated once: truncated, bit-flipped, bytes overwritten or inserted, headers corrupted,
sizes in the header set to extremes, files spliced, data appended, the wrong container (audio to an image
model, HLS/ffconcat playlists, TIFF, HDR...), or, for `yolov8`, wrong dtypes, shapes and values; and odd
options (thresholds, LANGUAGE, TASK, TEMPERATURE, PCM). Cases are seeded: case i of seed s is always the same.
Each answer is counted as a result, a clear error (INVALID_ARG naming the problem), an internal error, a
timeout, or a crash (a stub died, the server stopped answering or stopped being ready). Exit status 0 only if
there was no crash, internal error or timeout; the failing inputs are saved for replay.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import threading
import time
import wave
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
MODELS = ("detect", "easyocr", "whisper", "yolov8")
OUTCOMES = ("result", "clear error", "internal error", "timeout", "crash")


@dataclass
class Case:
    """One request: the model, what was done to the input, the input tensors (with the batch axis)."""

    index: int
    model: str
    mutation: str
    inputs: dict[str, np.ndarray]
    outputs: tuple[str, ...]


@dataclass
class Outcome:
    case: Case
    kind: str  # one of OUTCOMES
    message: str
    seconds: float


@dataclass
class FuzzOptions:
    url: str = "127.0.0.1:8001"  # gRPC
    http_url: str = "127.0.0.1:8000"  # for the readiness checks
    n: int = 200
    seed: int = 0
    models: tuple[str, ...] = MODELS
    concurrency: int = 4  # requests in flight: bad inputs share batches with other requests
    timeout: float = 300.0  # per request; a mutated header may state up to whisper's max_audio_seconds (2 h)
    server_pid: int | None = None  # tritonserver (or its supervisor): stub PIDs are compared before and after
    max_seconds: float | None = None  # send no new case after this long (the report says how many were sent)
    out: Path | None = None  # where failing inputs and the JSON summary go


# -- seeds: valid inputs of every documented kind ---------------------------------------------------------------

def image_seeds() -> list[bytes]:
    """Committed and bundled photos, plus one image in each accepted encoding and some edge shapes."""
    from ultralytics.utils import ASSETS

    files = [ASSETS / "bus.jpg", ASSETS / "zidane.jpg", *sorted(DATA.glob("ocr_*.png")),
             *sorted(DATA.glob("ocr_*.jpg"))]
    seeds = [path.read_bytes() for path in files]
    base = cv2.resize(cv2.imread(str(ASSETS / "bus.jpg")), (203, 270))
    encodings = [(".png", base, []), (".bmp", base, []), (".webp", base, [cv2.IMWRITE_WEBP_QUALITY, 80]),
                 (".webp", base, [cv2.IMWRITE_WEBP_QUALITY, 101]), (".jpg", base, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
                 (".png", cv2.cvtColor(base, cv2.COLOR_BGR2GRAY), []), (".png", np.dstack([base, base[..., :1]]), []),
                 (".png", np.full((1, 1, 3), 200, np.uint8), []), (".png", base[:3].repeat(10, 1), [])]
    seeds += [cv2.imencode(ext, image, params)[1].tobytes() for ext, image, params in encodings]
    return seeds


def audio_seeds() -> list[bytes]:
    """The committed speech in every container, plus short WAVs of other sample formats and layouts."""
    seeds = [path.read_bytes() for path in sorted(DATA.glob("speech_*"))]
    tone = np.sin(np.arange(8000) * 0.07)
    for channels, width, rate in ((1, 1, 8000), (2, 2, 44100), (1, 4, 22050)):
        buffer = io.BytesIO()
        with wave.open(buffer, "wb") as out:
            out.setnchannels(channels), out.setsampwidth(width), out.setframerate(rate)
            scale = {1: 100, 2: 20000, 4: 2 ** 30}[width]
            samples = (tone * scale + (128 if width == 1 else 0)).astype({1: "u1", 2: "<i2", 4: "<i4"}[width])
            out.writeframes(np.repeat(samples, channels).tobytes())
        seeds.append(buffer.getvalue())
    return seeds


def foreign_files() -> list[tuple[str, bytes]]:
    """Files of the wrong kind: other containers, playlists that name server-side files, empty and text."""
    image = np.zeros((64, 64, 3), np.uint8)
    foreign = [("empty", b""), ("text", b"name,value\nfoo,1\n" * 10), ("zip", b"PK\x03\x04" + bytes(100)),
               ("ffconcat", b"ffconcat version 1.0\nfile tests/data/speech_en.wav\n"),
               ("hls", b"#EXTM3U\n#EXTINF:1.0,\ntests/data/speech_en.wav\n#EXT-X-ENDLIST\n"),
               ("pdf", b"%PDF-1.4\n1 0 obj<<>>endobj\n"), ("svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>'),
               ("hdr", b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 9000 +X 9000\n" + bytes(64)),
               ("ppm", b"P6\n30000 30000\n255\n" + bytes(64))]
    for ext in (".tiff", ".ppm", ".pfm", ".ras", ".jp2", ".hdr"):
        ok, data = cv2.imencode(ext, image if ext != ".pfm" else image.astype(np.float32))
        if ok:
            foreign.append((ext[1:], data.tobytes()))
    return foreign


# -- mutations ----------------------------------------------------------------------------------------------------

EXTREMES = (0, 1, 2, 255, 65535, 65536, 10001, 2 ** 31 - 1, 2 ** 32 - 1)


def set_sizes(data: bytes, rng: np.random.Generator) -> bytes:
    """Rewrite the size fields a decoder trusts (image dimensions, sample rate, lengths) with extreme values."""
    out = bytearray(data)
    value = int(rng.choice(EXTREMES))

    def put(offset: int, size: int, order: str) -> None:
        if offset + size <= len(out):
            out[offset:offset + size] = (value % (1 << (8 * size))).to_bytes(size, order)

    if out[:8] == b"\x89PNG\r\n\x1a\n":
        put(16 + 4 * int(rng.integers(2)), 4, "big")
    elif out[:3] == b"\xff\xd8\xff":
        sof = next((i for i in range(2, len(out) - 9) if out[i] == 0xFF and out[i + 1] in (0xC0, 0xC1, 0xC2)), None)
        if sof is not None:
            put(sof + 5 + 2 * int(rng.integers(2)), 2, "big")
    elif out[:2] == b"BM":
        put(18 + 4 * int(rng.integers(2)), 4, "little")
    elif out[:4] == b"RIFF" and out[8:12] == b"WEBP":
        put(24 + 3 * int(rng.integers(2)), 3, "little")
    elif out[:4] == b"RIFF" and out[8:12] == b"WAVE":
        put(int(rng.choice([22, 24, 28, 32, 34, 40])), 2 if rng.integers(2) else 4, "little")  # fmt / data fields
    elif out[:4] == b"fLaC":
        put(int(rng.choice([18, 21, 22])), 4, "big")  # STREAMINFO: rate / channels / total samples
    else:
        put(int(rng.integers(0, max(1, min(64, len(out) - 4)))), 4, "big")
    return bytes(out)


def mutate(data: bytes, rng: np.random.Generator, others: list[bytes]) -> tuple[str, bytes]:
    """One random mutation of `data`: (its name, the mutated bytes)."""
    n = len(data)
    kind = str(rng.choice(["truncate", "bitflip", "overwrite", "header", "insert", "delete", "splice", "trailing",
                           "repeat", "sizes", "sizes"]))
    position = int(rng.integers(0, max(1, n)))
    if kind == "truncate":
        return kind, data[:int(rng.integers(0, max(1, n)))]
    if kind == "bitflip":
        out = bytearray(data)
        limit = min(n, 2048) if rng.integers(2) else n  # half the time in the headers
        for _ in range(int(rng.integers(1, 65))):
            i = int(rng.integers(0, max(1, limit)))
            if i < n:
                out[i] ^= 1 << int(rng.integers(8))
        return kind, bytes(out)
    if kind == "overwrite":
        length = int(rng.integers(1, 256))
        fill = [rng.bytes(length), b"\x00" * length, b"\xff" * length][int(rng.integers(3))]
        return kind, data[:position] + fill + data[position + length:]
    if kind == "header":
        out = bytearray(data)
        for _ in range(int(rng.integers(1, 9))):
            i = int(rng.integers(0, max(1, min(64, n))))
            if i < n:
                out[i] = int(rng.integers(256))
        return kind, bytes(out)
    if kind == "insert":
        return kind, data[:position] + rng.bytes(int(rng.integers(1, 4096))) + data[position:]
    if kind == "delete":
        return kind, data[:position] + data[position + int(rng.integers(1, 4096)):]
    if kind == "splice":
        other = others[int(rng.integers(len(others)))]
        return kind, data[:position] + other[int(rng.integers(0, max(1, len(other)))):]
    if kind == "trailing":
        tail = rng.bytes(int(rng.integers(1, 200_000))) if rng.integers(2) else others[int(rng.integers(len(others)))]
        return kind, data + tail
    if kind == "repeat":
        return kind, data[:position] + data[position:position + int(rng.integers(1, 8192))] * 3 + data[position:]
    return kind, set_sizes(data, rng)


# -- cases --------------------------------------------------------------------------------------------------------

class CaseMaker:
    """Builds case i of a seed for any model (deterministic)."""

    def __init__(self, seed: int):
        self.seed = seed
        self.images, self.audio, self.foreign = image_seeds(), audio_seeds(), foreign_files()
        from perf.inputs import letterboxed

        self.tensor = letterboxed(self.images[0])[None]  # a valid yolov8 input, [1, 3, H, W] (rect letterbox)

    def bytes_input(self, rng: np.random.Generator, seeds: list[bytes], wrong: list[bytes]) -> tuple[str, bytes]:
        """A mutated seed, most of the time; else a file of the wrong kind, or a seed unchanged."""
        roll = rng.random()
        if roll < 0.1:
            name, data = self.foreign[int(rng.integers(len(self.foreign)))]
            return f"foreign:{name}", data
        if roll < 0.15:
            return "other-model's input", wrong[int(rng.integers(len(wrong)))]
        if roll < 0.2:
            return "valid", seeds[int(rng.integers(len(seeds)))]
        return mutate(seeds[int(rng.integers(len(seeds)))], rng, seeds + wrong)

    def make(self, index: int, model: str) -> Case:
        rng = np.random.default_rng([self.seed, index])
        return getattr(self, model)(index, rng)

    def detect(self, index: int, rng: np.random.Generator) -> Case:
        mutation, data = self.bytes_input(rng, self.images, self.audio)
        inputs = {"IMAGE": _bytes_tensor(data)}
        if rng.random() < 0.15:
            name = str(rng.choice(["CONF_THRESHOLD", "IOU_THRESHOLD"]))
            value = rng.choice([np.nan, np.inf, -1.0, 0.0, 1.0, 2.0, 1e-30])
            dtype = np.float32 if rng.random() < 0.8 else np.float64
            inputs[name] = np.full((1, int(rng.choice([1, 1, 2]))), value, dtype)
            mutation += f" + {name}={value} {np.dtype(dtype).name}"
        return Case(index, "detect", mutation, inputs, ("BOXES", "SCORES", "CLASSES", "LABELS"))

    def easyocr(self, index: int, rng: np.random.Generator) -> Case:
        mutation, data = self.bytes_input(rng, self.images, self.audio)
        return Case(index, "easyocr", mutation, {"IMAGE": _bytes_tensor(data)}, ("BOXES", "TEXTS", "SCORES"))

    def whisper(self, index: int, rng: np.random.Generator) -> Case:
        inputs: dict[str, np.ndarray] = {}
        roll = rng.random()
        if roll < 0.1:  # raw PCM of odd kinds
            pcm = [np.zeros((1, 0), np.float32), np.full((1, 1600), np.nan, np.float32),
                   np.full((1, 1600), 1e30, np.float32), rng.normal(0, 1, (1, 16000)).astype(np.float32),
                   rng.normal(0, 1, (1, 16000)).astype(np.float64),
                   (rng.normal(0, 1, (1, 1600)) * 1e4).astype(np.int32)]
            choice = int(rng.integers(len(pcm)))
            inputs["PCM"] = pcm[choice]
            mutation = f"PCM #{choice} {pcm[choice].dtype}{list(pcm[choice].shape)}"
            if rng.random() < 0.3:
                inputs["AUDIO"] = _bytes_tensor(self.audio[0])
                mutation += " + AUDIO"
        else:
            mutation, data = self.bytes_input(rng, self.audio, self.images)
            inputs["AUDIO"] = _bytes_tensor(data)
        if rng.random() < 0.15:
            language = [b"\xff\xfe", b"xx", b"KOREAN", b"En", "한국어".encode(), b"a" * 10000, b"en\x00ko"]
            inputs["LANGUAGE"] = _bytes_tensor(language[int(rng.integers(len(language)))])
            mutation += " + LANGUAGE"
        if rng.random() < 0.1:
            task = [b"TRANSLATE", b"summarise", b"", b"\xc3\x28"]
            inputs["TASK"] = _bytes_tensor(task[int(rng.integers(len(task)))])
            mutation += " + TASK"
        # Greedy decoding keeps the cost of each valid-looking clip bounded; some cases fuzz the schedule.
        temperatures = [[0.0], [0.0], [0.0], [np.nan], [-1.0], [3.0], [], [0.0] * 1000, [0.0, 0.5]]
        temperature = temperatures[int(rng.integers(len(temperatures)))] if rng.random() < 0.2 else [0.0]
        inputs["TEMPERATURE"] = np.array(temperature, np.float32).reshape(1, -1)
        if temperature != [0.0]:
            mutation += f" + TEMPERATURE[{len(temperature)}]"
        return Case(index, "whisper", mutation, inputs, ("TEXT", "LANGUAGE", "SEGMENTS"))

    def yolov8(self, index: int, rng: np.random.Generator) -> Case:
        kinds = {
            "valid": lambda: self.tensor,
            "batch of 2": lambda: np.concatenate([self.tensor, self.tensor]),
            "empty batch": lambda: self.tensor[:0],
            "float16": lambda: self.tensor.astype(np.float16),
            "float64": lambda: self.tensor.astype(np.float64),
            "int32": lambda: self.tensor.astype(np.int32),
            "uint8": lambda: (self.tensor * 255).astype(np.uint8),
            "HWC": lambda: self.tensor.transpose(0, 2, 3, 1).copy(),
            "320x320": lambda: self.tensor[:, :, :320, :320].copy(),
            "320x330": lambda: np.pad(self.tensor[:, :, :320, :320], ((0, 0), (0, 0), (0, 0), (0, 10))),
            "672x640": lambda: np.pad(self.tensor[:, :, :, :640], ((0, 0), (0, 0), (0, 672 - self.tensor.shape[2]),
                                                                 (0, 0))),
            "no batch axis": lambda: self.tensor[0],
            "NaN": lambda: np.full_like(self.tensor, np.nan),
            "inf": lambda: np.where(rng.random(self.tensor.shape) < 0.01, np.inf, self.tensor).astype(np.float32),
            "1e30": lambda: np.full_like(self.tensor, 1e30),
            "noise": lambda: rng.normal(0, 100, self.tensor.shape).astype(np.float32),
        }
        kind = str(rng.choice(list(kinds)))
        inputs = {"images": kinds[kind]()}
        if rng.random() < 0.05:
            inputs = {"image": inputs["images"]}
            kind += ", wrong input name"
        return Case(index, "yolov8", kind, inputs, ("output0",))


def _bytes_tensor(data: bytes) -> np.ndarray:
    return np.array([[data]], dtype=np.object_)


# -- running ------------------------------------------------------------------------------------------------------

def classify(case: Case, call: Callable[[], object]) -> Outcome:
    """Run one request and name what came back."""
    from trident import InvalidInputError, ServerUnavailableError

    started = time.perf_counter()
    try:
        call()
        kind, message = "result", ""
    except InvalidInputError as exc:
        kind, message = "clear error", str(exc)
        if len(message) < len(case.model) + 10:  # "model: " and nothing that names the problem
            kind = "internal error"
    except ServerUnavailableError as exc:
        message = str(exc)
        kind = "timeout" if "Deadline" in message or "timed out" in message.lower() else "crash"
    except Exception as exc:  # noqa: BLE001 - ServerError and anything else: not a clear answer
        message = f"{type(exc).__name__}: {exc}"
        kind = "crash" if "is not healthy" in message or "Stub process" in message else "internal error"
    return Outcome(case, kind, message, time.perf_counter() - started)


def run(options: FuzzOptions, progress: bool = True) -> tuple[list[Outcome], list[str]]:
    """Send `n` cases spread over the models; returns the outcomes and the problems of the server itself."""
    from trident import Client
    from trident_serving import supervisor

    maker = CaseMaker(options.seed)
    client = Client(options.url, protocol="grpc", timeout=options.timeout)
    cases = [maker.make(i, options.models[i % len(options.models)]) for i in range(options.n)]
    stubs_before = _stubs(options.server_pid)
    problems: list[str] = []
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    ok, message = supervisor.check(options.http_url)
    if not ok:
        raise SystemExit(f"the server is not ready before fuzzing: {message}")

    deadline = time.monotonic() + options.max_seconds if options.max_seconds else None
    stop = threading.Event()  # Ctrl-C or the deadline: finish what is in flight, report what was answered

    def one(case: Case) -> None:
        if stop.is_set() or (deadline is not None and time.monotonic() > deadline):
            return
        outcome = classify(case, lambda: client.infer(case.model, case.inputs, list(case.outputs)))
        with lock:
            outcomes.append(outcome)
            done = len(outcomes)
            if done % 25 == 0 or done == len(cases):
                healthy, why = supervisor.check(options.http_url)
                if not healthy:
                    problems.append(f"after {done} requests: {why}")
                if progress:
                    counts = Counter(o.kind for o in outcomes)
                    print(f"  {done}/{len(cases)}: " + ", ".join(f"{counts[k]} {k}" for k in OUTCOMES if counts[k]),
                          flush=True)

    with ThreadPoolExecutor(options.concurrency) as pool:
        try:
            list(pool.map(one, cases))
        except KeyboardInterrupt:
            stop.set()
            print("interrupted: waiting for the requests in flight", flush=True)
    stubs_after = _stubs(options.server_pid)
    if stubs_before != stubs_after:
        problems.append(f"stub processes changed (a stub died and was replaced): {stubs_before} -> {stubs_after}")
    healthy, why = supervisor.check(options.http_url)
    if not healthy:
        problems.append(f"at the end: {why}")
    outcomes.sort(key=lambda o: o.case.index)
    return outcomes, problems


def _stubs(pid: int | None) -> dict[str, list[int]]:
    """{model: stub PIDs} of the server, if its PID is known."""
    from trident_serving import supervisor

    if pid is None:
        return {}
    found: dict[str, list[int]] = {}
    for stub in supervisor.find_stubs(supervisor.triton_pid(pid)).values():
        found.setdefault(stub.model, []).append(stub.pid)
    return {model: sorted(pids) for model, pids in sorted(found.items())}


def summary(outcomes: list[Outcome], problems: list[str]) -> dict:
    """Counts per model and outcome, the slowest answers, and the failures (first 20)."""
    table = {model: {kind: 0 for kind in OUTCOMES} for model in sorted({o.case.model for o in outcomes})}
    for outcome in outcomes:
        table[outcome.case.model][outcome.kind] += 1
    failures = [o for o in outcomes if o.kind not in ("result", "clear error")]
    return {
        "requests": len(outcomes),
        "counts": table,
        "totals": dict(Counter(o.kind for o in outcomes)),
        "slowest_s": {m: round(max((o.seconds for o in outcomes if o.case.model == m), default=0), 2) for m in table},
        "server_problems": problems,
        "failures": [{"case": o.case.index, "model": o.case.model, "mutation": o.case.mutation, "kind": o.kind,
                      "message": o.message[:300]} for o in failures[:20]],
        "ok": not failures and not problems,
    }


def save_failures(outcomes: list[Outcome], folder: Path) -> None:
    """Each failing case's inputs as .npy files (np.load(..., allow_pickle=True) replays them)."""
    for outcome in outcomes:
        if outcome.kind in ("result", "clear error"):
            continue
        case_dir = folder / f"case-{outcome.case.index:05d}-{outcome.case.model}"
        case_dir.mkdir(parents=True, exist_ok=True)
        for name, array in outcome.case.inputs.items():
            np.save(case_dir / f"{name}.npy", array, allow_pickle=True)
        (case_dir / "outcome.json").write_text(json.dumps(
            {"mutation": outcome.case.mutation, "kind": outcome.kind, "message": outcome.message}, indent=2))


def print_summary(result: dict, seconds: float) -> None:
    print(f"\nfuzz: {result['requests']} of {result.get('n', result['requests'])} requests sent and answered "
          f"in {seconds:.0f} s (seed {result.get('seed')})")
    print(f"{'model':<10}" + "".join(f"{k:>16}" for k in OUTCOMES) + f"{'slowest s':>12}")
    for model, counts in result["counts"].items():
        print(f"{model:<10}" + "".join(f"{counts[k]:>16}" for k in OUTCOMES) + f"{result['slowest_s'][model]:>12}")
    for problem in result["server_problems"]:
        print(f"SERVER: {problem}")
    for failure in result["failures"]:
        print(f"FAILED case {failure['case']} {failure['model']} ({failure['mutation']}): {failure['kind']}: "
              f"{failure['message']}")
    print("OK: the server answered every request and stayed ready" if result["ok"] else "NOT OK")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=FuzzOptions.n, help="requests (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default=",".join(MODELS), help="comma separated (default: all four)")
    parser.add_argument("--concurrency", type=int, default=FuzzOptions.concurrency)
    parser.add_argument("--url", help="gRPC address of a running server (default: start one)")
    parser.add_argument("--http-url", help="its HTTP address (default: the gRPC host, port 8000)")
    parser.add_argument("--server-pid", type=int, help="with --url: its PID (or its supervisor's), so that stub "
                        "deaths are seen even when the supervisor repairs them")
    parser.add_argument("--repository", type=Path, help="exported repository to serve (default: the perf suite's CPU "
                        "export in perf/results/repository-cpu)")
    parser.add_argument("--max-seconds", type=float, help="send no new case after this long (default: no limit)")
    parser.add_argument("--out", type=Path, default=ROOT / "perf" / "results" / "fuzz")
    args = parser.parse_args(argv)
    options = FuzzOptions(n=args.n, seed=args.seed, models=tuple(m for m in args.models.split(",") if m),
                          concurrency=args.concurrency, out=args.out, max_seconds=args.max_seconds)
    unknown = set(options.models) - set(MODELS)
    if unknown:
        raise SystemExit(f"unknown models {sorted(unknown)}; choose from {', '.join(MODELS)}")
    with serving(args.url, args.http_url, args.repository, args.out / "server") as (grpc, http, pid):
        options.url, options.http_url, options.server_pid = grpc, http, pid if pid is not None else args.server_pid
        started = time.perf_counter()
        outcomes, problems = run(options)
        result = summary(outcomes, problems)
    result.update(seed=options.seed, n=options.n, seconds=round(time.perf_counter() - started, 1))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(result, indent=2))
    save_failures(outcomes, args.out / "failures")
    print_summary(result, result["seconds"])
    print(f"summary: {args.out / 'summary.json'}")
    return 0 if result["ok"] else 1


class serving:
    """Context manager: (gRPC url, HTTP url, server PID or None) of the given server, or of one started here on
    free ports from `repository` (exported first, as `python -m perf` does in CPU mode, if it has no export.json)."""

    def __init__(self, url: str | None, http_url: str | None, repository: Path | None, run_dir: Path):
        self.url, self.http_url, self.repository, self.run_dir = url, http_url, repository, run_dir
        self.options = None

    def __enter__(self) -> tuple[str, str, int | None]:
        if self.url:
            return self.url, self.http_url or f"{self.url.rsplit(':', 1)[0]}:8000", None
        from perf.__main__ import export
        from trident_serving import server

        repository = self.repository or ROOT / "perf" / "results" / "repository-cpu"
        manifest = repository / "export.json"
        if not manifest.exists() or not {"yolov8", "whisper", "easyocr"} <= set(json.loads(manifest.read_text())):
            print(f"exporting weights into {repository} ...", flush=True)
            export(repository, "cpu", MODELS)
        self.options = server.on_free_ports(repository=repository, run_dir=self.run_dir, ready_timeout=1200)
        print(f"starting tritonserver on {repository} ...", flush=True)
        pid = server.start(self.options)
        return f"127.0.0.1:{self.options.grpc_port}", f"127.0.0.1:{self.options.http_port}", pid

    def __exit__(self, *exc) -> None:
        if self.options is not None:
            from trident_serving import server

            server.stop(self.options)


if __name__ == "__main__":
    sys.exit(main())
