"""The benchmark suite: perf_analyzer sweeps of every served model, batching on and off, and baselines.

Batching on/off on the same instances: the server runs in explicit model-control mode; each model is loaded
with its repository config ("on"), measured, then loaded again with a config override (tritonclient
`load_model(name, config=...)`) that removes `dynamic_batching` ("off": Triton hands the model one request
at a time). `whisper` batches the windows of its queued requests itself, so its "off" override also sets
the parameter `max_windows_per_step` to 1 (one transcription advanced per scheduler step).

Rect against square letterboxing: `detect` is measured a third time ("square": batching on, the override
`letterbox: square`) on photos of four shapes, and `yolov8` on the rect and the square tensors of the same
photos; the baseline is `predict()` with its defaults (rect), what a user runs.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from . import analyzer, baselines
from .inputs import Manifest, read_entry

# Which model measures which inputs at which concurrencies, per mode.
#   cpu: ~10 minutes on a 2-core machine; gpu: the full sweep for one GPU; smoke: seconds (tests).
PLANS: dict[str, dict[str, list[tuple[str, tuple[int, ...]]]]] = {
    "cpu": {
        "detect": [("jpeg-640x480", (1, 4, 8)), ("jpeg-1280x720", (1, 4, 8)), ("jpeg-1280x320", (1, 4, 8)),
                   ("jpeg-720x1280", (1, 4, 8))],
        "yolov8": [("letterboxed", (1, 4, 8)), ("letterboxed-square", (1, 4, 8))],
        "whisper": [("speech-5s", (1, 4))],
        "easyocr": [("pages-1280x720", (1, 2))],  # ~8 s a page on 2 cores
    },
    "gpu": {
        "detect": [("jpeg-640x480", (1, 32, 128, 256)), ("jpeg-1280x720", (1, 32, 128)), ("jpeg-1280x320", (128,)),
                   ("jpeg-720x1280", (128,))],
        "yolov8": [("letterboxed", (1, 64, 128)), ("letterboxed-square", (1, 64, 128))],
        "whisper": [("speech-30s", (1, 32, 64)), ("speech-5s", (64,)), ("speech-2min", (16,))],
        "easyocr": [("pages-1280x720", (1, 8, 32))],
    },
}
# The variants measured per model, in order; "square" (batching on, detect's `letterbox: square`) is detect's only.
VARIANTS = ("on", "off", "square")
SQUARE_MODELS = ("detect",)
# With batching off a model serves one request (whisper: one transcription) at a time, so its throughput is
# flat in concurrency: "off" is measured at the highest level only (the gain is best on / best off; an explicit
# --concurrency measures every level), and on a GPU the baseline on each model's first input set only, to
# stay within the GPU run's minutes.
# Measurement settings per mode: window (time windows, ms, or count windows: requests per concurrent client),
# stability (%), trials. On a shared CPU machine the timing noise exceeds perf_analyzer's 10 % stability test,
# so there it measures three count windows and reports what it saw (a time window may see no request finish).
SETTINGS = {"cpu": ("count", 5, 1000.0, 3), "gpu": ("time", 2500, 25.0, 4), "smoke": ("count", 2, 1000.0, 3)}
# Slow models get fewer requests per window (CPU) or longer windows (GPU).
SLOW = {"whisper": 0.2, "easyocr": 0.2}
OUTPUT_SHM_BYTES = {"yolov8": 84 * 8400 * 4}  # output0 of one image, float32
COMPOSING = {"detect": ("yolov8",)}
DEPENDENCIES = {"detect": ("yolov8",)}
MODELS = ("detect", "yolov8", "easyocr", "whisper")  # whisper last: the slowest on a CPU


@dataclass
class SuiteOptions:
    mode: str = "cpu"
    models: tuple[str, ...] = MODELS
    repository: Path = Path("model_repository")
    data: Path = Path("perf/data")
    out: Path = Path("perf/results/cpu")
    url: str = "127.0.0.1:8001"  # gRPC
    metrics_url: str | None = "127.0.0.1:8002/metrics"
    http_url: str = "127.0.0.1:8000"
    batching: tuple[str, ...] = VARIANTS  # "off" and "square" need a server in explicit model-control mode
    toggle: bool = True  # load/unload models (explicit mode); False: measure the models as already loaded
    concurrency: tuple[int, ...] | None = None  # overrides the plan's levels
    input_sets: dict[str, str] = field(default_factory=dict)  # model -> input set, overrides the plan
    baselines: bool = True
    baseline_seconds: float = 10.0


@dataclass
class Result:
    """One served measurement (a perf_analyzer CSV row) with what it measured."""

    model: str
    input_set: str
    batching: str
    concurrency: int
    values: dict

    def row(self) -> dict:
        return {"model": self.model, "input_set": self.input_set, "batching": self.batching, **self.values}


def batching_off(config: dict) -> dict:
    """The override of a loaded model's config that turns batching off on the same instances."""
    config = copy.deepcopy(config)
    config.pop("dynamic_batching", None)
    if config.get("name") == "whisper":
        config.setdefault("parameters", {})["max_windows_per_step"] = {"string_value": "1"}
    return config


def letterbox_square(config: dict) -> dict:
    """The override of detect's loaded config that letterboxes every image to the 640x640 square."""
    config = copy.deepcopy(config)
    config.setdefault("parameters", {})["letterbox"] = {"string_value": "square"}
    return config


def variants_for(options: SuiteOptions, model: str) -> tuple[str, ...]:
    """The variants measured for `model`: batching on (only, when models are not toggled), off, square."""
    variants = options.batching if options.toggle else options.batching[:1]
    return tuple(v for v in variants if v != "square" or model in SQUARE_MODELS)


def whisper_off_supported(repository: Path) -> bool:
    """Whether the whisper model reads `max_windows_per_step` (else "off" only stops Triton's batching)."""
    import trident_serving.asr as asr

    sources = [repository / "whisper" / "1" / "model.py", Path(asr.__file__)]
    return any("max_windows_per_step" in p.read_text() for p in sources if p.exists())


def levels_for(options: SuiteOptions, batching: str, levels: tuple[int, ...]) -> tuple[int, ...]:
    """The concurrency levels to measure for one variant."""
    if options.mode != "smoke" and batching == "off" and not options.concurrency:
        return (max(levels),)
    return levels


def plan(options: SuiteOptions) -> list[tuple[str, str, tuple[int, ...]]]:
    """(model, input set, concurrencies) to measure, in order."""
    table = PLANS["cpu" if options.mode == "smoke" else options.mode]
    out = []
    for model in options.models:
        entries = table[model][:1] if options.mode == "smoke" else table[model]
        if model in options.input_sets:
            entries = [(options.input_sets[model], entries[0][1])]
        for input_set, levels in entries:
            out.append((model, input_set, options.concurrency or levels))
    return out


class Loader:
    """Loads models (with an optional config override) on a server in explicit model-control mode."""

    def __init__(self, url: str):
        import tritonclient.grpc as grpcclient

        from trident.calls import admin_headers

        self.client = grpcclient.InferenceServerClient(url)
        self.headers = admin_headers("grpc")  # a restricted model-repository API's key ($TRIDENT_ADMIN_KEY)

    def load(self, model: str, batching: str) -> None:
        for dependency in DEPENDENCIES.get(model, ()):
            self.client.load_model(dependency, headers=self.headers)
        if batching == "on":
            # the repository's config (a reload also drops an earlier override)
            self.client.load_model(model, headers=self.headers)
        else:
            # Override from the config as loaded, so instances and everything else stay the same.
            if not self.client.is_model_ready(model):
                self.client.load_model(model, headers=self.headers)
            config = self.client.get_model_config(model, as_json=True)["config"]
            override = batching_off(config) if batching == "off" else letterbox_square(config)
            self.client.load_model(model, headers=self.headers, config=json.dumps(override))
        if not self.client.is_model_ready(model):
            raise RuntimeError(f"{model} did not become ready ({batching=})")

    def unload(self, model: str) -> None:
        for name in (model, *DEPENDENCIES.get(model, ())):
            self.client.unload_model(name, headers=self.headers)
        # unloading is asynchronous: wait until the instances are gone before measuring the next model
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            index = {m["name"]: m.get("state", "") for m in self.client.get_model_repository_index(
                headers=self.headers, as_json=True).get("models", [])}
            if all(index.get(n) != "READY" for n in (model, *DEPENDENCIES.get(model, ()))):
                return
            time.sleep(0.5)


def warm_up(url: str, model: str, input_data: Path) -> None:
    """One unmeasured request with the input set's first entry. The first request after a load pays one-off
    costs (lazy imports, allocator growth, the runtime's first run: up to 2 s on a CPU) that would otherwise
    weigh on a short count window; the baselines warm up the same way. Input data it cannot read, or a request
    the server refuses, is left to perf_analyzer to report in its own words."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    try:
        tensors = read_entry(json.loads(input_data.read_text())["data"][0])
    except (ValueError, KeyError, IndexError, TypeError):
        return
    request = []
    for name, array in tensors.items():
        tensor = grpcclient.InferInput(name, list(array.shape), "BYTES" if array.dtype == object else "FP32")
        tensor.set_data_from_numpy(array)
        request.append(tensor)
    with grpcclient.InferenceServerClient(url) as client:
        try:
            client.infer(model, request, client_timeout=900)
        except InferenceServerException:
            pass


def run(options: SuiteOptions, manifest: Manifest, progress: bool = True,
        results: list[Result] | None = None, found_baselines: list | None = None) -> tuple[list[Result], list]:
    """Per model: its baseline, then its planned perf_analyzer measurements; returns (results, baselines).

    Measurements are appended to `results` / `found_baselines` when given, so an interrupted run keeps them.
    """
    steps = plan(options)
    baseline_steps = [s for i, s in enumerate(steps) if options.mode != "gpu" or s[0] not in
                      {m for m, _, _ in steps[:i]}]
    total = sum(len(levels_for(options, b, levels)) for m, _, levels in steps for b in variants_for(options, m))
    total += len(baseline_steps) if options.baselines else 0
    bar = tqdm(total=total, desc="perf", unit="run", disable=not progress)
    results = [] if results is None else results
    found_baselines = [] if found_baselines is None else found_baselines
    windows, size, stability, trials = SETTINGS[options.mode]
    try:
        loader = Loader(options.url) if options.toggle and options.batching else None
        for model in dict.fromkeys(m for m, _, _ in steps):
            # Each model's baseline right before its served runs, while the server is idle (in explicit mode
            # with no model loaded): on a shared machine the load drifts, so side by side beats all first.
            for m, input_set, _ in baseline_steps if options.baselines else ():
                if m == model:
                    bar.set_postfix_str(f"baseline {model} {input_set}")
                    found_baselines.append(baselines.run(model, manifest.sets[input_set], manifest,
                                                         options.repository, min_seconds=options.baseline_seconds))
                    bar.update()
            for batching in variants_for(options, model):
                if loader:
                    bar.set_postfix_str(f"loading {model} (batching {batching})")
                    loader.load(model, batching)
                for m, input_set, levels in steps:
                    if m != model:
                        continue
                    bar.set_postfix_str(f"warming up {model} (batching {batching})")
                    warm_up(options.url, model, manifest.path(manifest.sets[input_set].input_data))
                    for concurrency in levels_for(options, batching, levels):
                        bar.set_postfix_str(f"{model} {input_set} batching {batching} c{concurrency}")
                        measurement = analyzer.Measurement(
                            model=model, input_data=manifest.path(manifest.sets[input_set].input_data),
                            concurrency=concurrency, url=options.url, metrics_url=options.metrics_url,
                            interval_ms=int(size / SLOW.get(model, 1.0)) if windows == "time" else 0,
                            request_count=(max(2, int(size * SLOW.get(model, 1.0) * concurrency))
                                           if windows == "count" else None),
                            stability_percent=stability,
                            max_trials=trials, shared_memory="system" if model == "yolov8" else "none",
                            output_shm_bytes=OUTPUT_SHM_BYTES.get(model, 0),
                            composing_models=COMPOSING.get(model, ()))
                        values = analyzer.run(measurement, options.out / "perf_analyzer" / f"{batching}-{input_set}")
                        results.append(Result(model, input_set, batching, concurrency, values))
                        bar.update()
            if loader:
                loader.unload(model)
    finally:
        bar.close()
    return results, found_baselines
