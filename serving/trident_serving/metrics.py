"""Trident's model-level Prometheus metrics, published on Triton's metrics endpoint (:8002/metrics).

Triton times `execute()`; what happens inside a model (how many images one BLS call carries, how many text
crops one recogniser pass reads, what the Whisper worker is doing after `execute()` has returned) is only
visible through these. Every name lives here, in `CATALOGUE`, so the dashboard, the README and the tests
refer to one list. Names follow Prometheus conventions: `trident_` prefix, unit in the name, `_total` on
counters (Triton 2.51's `pb_utils.MetricFamily` publishes the name as given and appends nothing; histograms
get `_bucket`, `_sum` and `_count`). Labels are Triton's own: `model` and `version`.

`triton_python_backend_utils` exists only inside the Python-backend stub, so it is imported when a model
creates its metrics, not when this module is imported.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"


@dataclass(frozen=True)
class Spec:
    """One metric family: name, kind, help text, (histograms only) bucket upper bounds, and the labels its
    series carry besides model and version (a series per value is created when first used)."""

    name: str
    kind: str
    help: str
    buckets: tuple[float, ...] = field(default=())
    labels: tuple[str, ...] = field(default=())


# Powers of two up to the largest max_batch_size of the repository (detect: 64).
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

REQUEST_ERRORS = Spec(
    "trident_request_errors_total", COUNTER,
    "Requests a Python model answered with an error, by Triton error code (INVALID_ARG, UNAVAILABLE, ...). "
    "Triton's nv_inference_request_failure does not count these: it sees a successful execution.",
    labels=("code",))
DETECT_BLS_IMAGES = Spec(
    "trident_detect_bls_call_images", HISTOGRAM,
    "Images per BLS call from detect to yolov8 (the batch yolov8 receives).", _BATCH_BUCKETS)
EASYOCR_BATCH_CROPS = Spec(
    "trident_easyocr_batch_text_crops", HISTOGRAM,
    "Text crops recognised together per easyocr batch (all images of one execute).",
    (1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
WHISPER_ACTIVE = Spec(
    "trident_whisper_active_transcriptions", GAUGE,
    "Transcriptions admitted to the whisper worker and not finished (queued or being decoded).")
WHISPER_QUEUED_AUDIO = Spec(
    "trident_whisper_queued_audio_seconds", GAUGE,
    "Audio seconds held by the admitted transcriptions (each counted whole, at least 30 s): what the "
    "max_queued_audio_seconds admission limit bounds.")
WHISPER_STEP_WINDOWS = Spec(
    "trident_whisper_step_windows", HISTOGRAM,
    "30-second windows decoded together per whisper worker step (the continuous batch size).", _BATCH_BUCKETS)
WHISPER_FALLBACKS = Spec(
    "trident_whisper_temperature_fallbacks_total", COUNTER,
    "Windows decoded again at a higher temperature after failing whisper's checks.")
WHISPER_AUDIO = Spec(
    "trident_whisper_transcribed_audio_seconds_total", COUNTER,
    "Audio seconds of successfully finished transcriptions.")
WHISPER_ENGINE = Spec(
    "trident_whisper_engine_info", GAUGE,
    "1 for the engine whisper is served with (openai or ctranslate2) and its compute type.",
    labels=("engine", "compute_type"))
WHISPER: tuple[Spec, ...] = (WHISPER_ACTIVE, WHISPER_QUEUED_AUDIO, WHISPER_STEP_WINDOWS, WHISPER_FALLBACKS,
                             WHISPER_AUDIO, WHISPER_ENGINE)

CATALOGUE: tuple[Spec, ...] = (REQUEST_ERRORS, DETECT_BLS_IMAGES, EASYOCR_BATCH_CROPS, *WHISPER)


class ModelMetrics:
    """The metrics `specs` of one model instance, labelled {model, version} like Triton's nv_inference_*.

    Instances of one model (one stub process each, e.g. one per GPU) register the same family and labels and
    so share one series: counters and histograms add up, and gauges are moved by differences (`set`), so the
    published gauge is the sum over instances.
    """

    def __init__(self, args: dict, specs: Sequence[Spec]):
        import triton_python_backend_utils as pb_utils

        kinds = {COUNTER: pb_utils.MetricFamily.COUNTER, GAUGE: pb_utils.MetricFamily.GAUGE,
                 HISTOGRAM: pb_utils.MetricFamily.HISTOGRAM}
        self._labels = {"model": args["model_name"], "version": args["model_version"]}
        # A family must outlive its metrics (the stub refuses operations otherwise): keep both.
        self._families: dict[str, Any] = {}
        self._metrics: dict[tuple, Any] = {}
        self._shares: dict[str, float] = {}
        self.lock = threading.Lock()  # for callers that publish the same gauges from several threads
        for spec in specs:
            self._families[spec.name] = pb_utils.MetricFamily(name=spec.name, description=spec.help,
                                                              kind=kinds[spec.kind])
            self._shares[spec.name] = 0.0
            if not spec.labels:  # published (at 0) from the start, so dashboards show the model at once
                self._metric(spec)

    def _metric(self, spec: Spec, **labels: str) -> Any:
        key = (spec.name, *sorted(labels.items()))
        if key not in self._metrics:
            if set(labels) != set(spec.labels):
                raise ValueError(f"{spec.name} takes the labels {spec.labels}, got {sorted(labels)}")
            extra = {"buckets": [float(b) for b in spec.buckets]} if spec.kind == HISTOGRAM else {}
            self._metrics[key] = self._families[spec.name].Metric(labels={**self._labels, **labels}, **extra)
        return self._metrics[key]

    def touch(self, spec: Spec, **labels: str) -> None:
        """Publish a labelled series at 0 before its first event, so that rate() sees that event."""
        self._metric(spec, **labels)

    def inc(self, spec: Spec, amount: float = 1.0, **labels: str) -> None:
        """Add `amount` (≥ 0) to a counter or gauge (`labels`: the spec's own labels, e.g. code="INVALID_ARG")."""
        if amount:
            self._metric(spec, **labels).increment(float(amount))

    def observe(self, spec: Spec, value: float) -> None:
        """Record one observation of a histogram."""
        self._metric(spec).observe(float(value))

    def count_to(self, spec: Spec, total: float) -> None:
        """Bring a counter to this instance's running `total` (e.g. a scheduler's own tally)."""
        delta = float(total) - self._shares[spec.name]
        if delta > 0:
            self.inc(spec, delta)
            self._shares[spec.name] = float(total)

    def mark(self, spec: Spec, **labels: str) -> None:
        """Set an info gauge's series to 1, whatever it held: Triton keeps a model's metric series across reloads
        (even a killed stub's), so a gauge moved by differences would count every load."""
        self._metric(spec, **labels).set(1.0)

    def set(self, spec: Spec, value: float) -> None:
        """Set this instance's share of a gauge (by difference, so instances' shares add up)."""
        delta = float(value) - self._shares[spec.name]
        if delta:
            self._metric(spec).increment(delta)
            self._shares[spec.name] = float(value)


def publish_whisper_queue(metrics: ModelMetrics, stats: Any) -> None:
    """When a whisper job is admitted (an `execute` thread) or after a step (the worker): the active-jobs and
    queued-audio gauges from the scheduler's tallies (trident_serving.asr.SchedulerStats). Read and published
    under one lock, so the value published last is the latest one."""
    with metrics.lock:
        metrics.set(WHISPER_ACTIVE, stats.active_jobs)
        metrics.set(WHISPER_QUEUED_AUDIO, stats.queued_audio_seconds)


def publish_whisper_step(metrics: ModelMetrics, stats: Any) -> None:
    """After one whisper worker step: publish the scheduler's tallies."""
    metrics.observe(WHISPER_STEP_WINDOWS, stats.last_step_windows)
    metrics.count_to(WHISPER_FALLBACKS, stats.fallbacks)
    publish_whisper_queue(metrics, stats)
