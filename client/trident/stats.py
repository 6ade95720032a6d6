"""`trident stats`: what the server is doing, from Triton's Prometheus endpoint (:8002/metrics), without Grafana.

Two scrapes `interval` seconds apart give per-model rates and per-request averages over that interval
(counters are cumulative: the differences are what happened in between); p99 comes from Triton's latency
summaries (`--metrics-config summary_latencies=true`, a sliding window kept by the server). With no first
scrape (`interval` 0) the averages cover everything since the server started.
"""
from __future__ import annotations

import time
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Dict, FrozenSet, Optional, Tuple

from prometheus_client.parser import text_string_to_metric_families

Key = Tuple[str, FrozenSet[Tuple[str, str]]]
ERRORS = "trident_request_errors_total"  # trident_serving.metrics.REQUEST_ERRORS (the client imports no server code)


@dataclass
class Snapshot:
    """One scrape: {(sample name, labels): value} and {family name: type}, taken at `time` (monotonic s)."""

    time: float
    samples: Dict[Key, float]
    types: Dict[str, str] = field(default_factory=dict)

    def total(self, name: str, **match: str) -> float:
        """Sum of the samples called `name` whose labels include `match` (a counter with or without `_total`)."""
        name = self._canonical(name)
        wanted = set(match.items())
        return sum(v for (n, labels), v in self.samples.items() if n == name and wanted <= labels)

    def label_values(self, name: str, label: str) -> list[str]:
        name = self._canonical(name)
        return sorted({dict(labels)[label] for n, labels in self.samples if n == name and label in dict(labels)})

    def _canonical(self, name: str) -> str:
        """Sample names are kept as the parser's family names: a counter's without `_total`."""
        if name.endswith("_total") and self.types.get(name[: -len("_total")]) == "counter":
            return name[: -len("_total")]
        return name


def parse(text: str, at: Optional[float] = None) -> Snapshot:
    """Parse Prometheus text exposition with prometheus_client's parser.

    The parser reports a counter's sample as `<name>_total` even where the server wrote `<name>` (Triton's
    `nv_inference_count`); keys drop that suffix again so they read as the server's names.
    """
    samples: Dict[Key, float] = {}
    types: Dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            name = sample.name
            if family.type == "counter" and name.endswith("_total"):
                name = name[: -len("_total")]
            samples[(name, frozenset(sample.labels.items()))] = float(sample.value)
    return Snapshot(time.monotonic() if at is None else at, samples, types)


def scrape(url: str, timeout: float = 10.0) -> Snapshot:
    """Fetch and parse the metrics endpoint `url` (e.g. http://localhost:8002/metrics)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return parse(response.read().decode("utf-8"))


@dataclass
class ModelStats:
    """One model over the interval. Times are milliseconds per request; None where nothing happened."""

    model: str
    requests_per_s: float
    failures_per_s: float
    failures_by_reason: Dict[str, float]
    inferences_per_s: float
    executions_per_s: float
    avg_batch: Optional[float]  # inferences per model execution
    queue_ms: Optional[float]
    compute_ms: Optional[float]  # compute input + infer + output
    p99_ms: Optional[float]  # Triton's request-latency summary (sliding window)
    pending: float
    extra: Dict[str, float] = field(default_factory=dict)  # trident_* model-level metrics


@dataclass
class GPUStats:
    gpu: str
    memory_used_bytes: float
    memory_total_bytes: float
    utilization: float
    power_watts: float


@dataclass
class Report:
    url: str
    seconds: float  # length of the interval; since the server started when `since_start`
    since_start: bool
    models: list  # of ModelStats
    gpus: list  # of GPUStats
    cpu_utilization: Optional[float]
    cpu_memory_used_bytes: Optional[float]
    cpu_memory_total_bytes: Optional[float]

    def to_dict(self) -> dict:
        return asdict(self)


def _ratio(numerator: float, denominator: float) -> Optional[float]:
    return numerator / denominator if denominator > 0 else None


def compute(after: Snapshot, before: Optional[Snapshot] = None, url: str = "") -> Report:
    """Stats between two scrapes (or since the server started when `before` is None)."""
    empty = Snapshot(after.time, {})
    base = before or empty
    seconds = after.time - base.time if before else 0.0

    def delta(name: str, **match: str) -> float:
        return after.total(name, **match) - base.total(name, **match)

    def rate(value: float) -> float:
        return value / seconds if seconds > 0 else value  # since start: a count, not a rate

    models = []
    for model in after.label_values("nv_inference_request_success", "model"):
        success = delta("nv_inference_request_success", model=model)
        failures = {reason: delta("nv_inference_request_failure", model=model, reason=reason)
                    for reason in after.label_values("nv_inference_request_failure", "reason")}
        # Error responses of Python models: Triton counts them as successes, Trident by error code.
        failures.update({f"answered {code}": delta(ERRORS, model=model, code=code)
                         for code in after.label_values(ERRORS, "code")})
        count, executions = delta("nv_inference_count", model=model), delta("nv_inference_exec_count", model=model)
        compute_us = sum(delta(f"nv_inference_compute_{part}_duration_us", model=model)
                         for part in ("input", "infer", "output"))
        p99 = after.total("nv_inference_request_summary_us", model=model, quantile="0.99")
        models.append(ModelStats(
            model=model,
            requests_per_s=rate(success),
            failures_per_s=rate(sum(failures.values())),
            failures_by_reason={r: rate(v) for r, v in failures.items() if v},
            inferences_per_s=rate(count),
            executions_per_s=rate(executions),
            avg_batch=_ratio(count, executions),
            queue_ms=_none_or(_ratio(delta("nv_inference_queue_duration_us", model=model), success), 1e-3),
            compute_ms=_none_or(_ratio(compute_us, success), 1e-3),
            p99_ms=p99 / 1000 if p99 == p99 and p99 > 0 else None,  # absent, or NaN for an empty window
            pending=after.total("nv_inference_pending_request_count", model=model),
            extra=_model_level(model, delta, rate, after),
        ))

    gpus = [GPUStats(gpu=uuid,
                     memory_used_bytes=after.total("nv_gpu_memory_used_bytes", gpu_uuid=uuid),
                     memory_total_bytes=after.total("nv_gpu_memory_total_bytes", gpu_uuid=uuid),
                     utilization=after.total("nv_gpu_utilization", gpu_uuid=uuid),
                     power_watts=after.total("nv_gpu_power_usage", gpu_uuid=uuid))
            for uuid in after.label_values("nv_gpu_memory_total_bytes", "gpu_uuid")]

    def present(name: str) -> Optional[float]:
        return after.total(name) if any(n == name for n, _ in after.samples) else None

    return Report(url=url, seconds=seconds, since_start=before is None, models=models, gpus=gpus,
                  cpu_utilization=present("nv_cpu_utilization"),
                  cpu_memory_used_bytes=present("nv_cpu_memory_used_bytes"),
                  cpu_memory_total_bytes=present("nv_cpu_memory_total_bytes"))


def _none_or(value: Optional[float], scale: float) -> Optional[float]:
    return None if value is None else value * scale


def _model_level(model: str, delta, rate, after: Snapshot) -> Dict[str, float]:
    """Trident's own metrics of `model` (trident_serving.metrics): histogram averages, counter rates, gauges."""
    extra: Dict[str, float] = {}
    for name, kind in sorted(after.types.items()):
        series = name + "_count" if kind == "histogram" else name
        if not name.startswith("trident_") or name + "_total" == ERRORS or not any(
                n == series and ("model", model) in labels for n, labels in after.samples):
            continue  # not ours, or another model's
        if kind == "histogram":  # e.g. images per BLS call: the average observation of the interval
            average = _ratio(delta(name + "_sum", model=model), delta(name + "_count", model=model))
            if average is not None:
                extra[f"{name} (average)"] = average
        elif kind == "counter":
            extra[f"{name}_total"] = rate(delta(name, model=model))
        else:  # a gauge; one entry per value of its own labels (e.g. whisper's engine), if it has any
            for (sample, labels), value in after.samples.items():
                own = {k: v for k, v in labels if k not in ("model", "version")}
                if sample == name and ("model", model) in labels:
                    key = name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(own.items())) + "}" if own else "")
                    extra[key] = extra.get(key, 0.0) + value
    return extra


def _fmt(value: Optional[float], spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def render(report: Report) -> str:
    """A plain-text table of `report`."""
    span = "since the server started" if report.since_start else f"over the last {report.seconds:.1f} s"
    unit = "" if report.since_start else "/s"
    lines = [f"{report.url}  {span}",
             f"{'model':<10} {'req' + unit:>8} {'fail' + unit:>7} {'infer' + unit:>8} {'exec' + unit:>8} "
             f"{'batch':>6} {'queue ms':>9} {'compute ms':>10} {'p99 ms':>8} {'pending':>7}"]
    for m in report.models:
        lines.append(f"{m.model:<10} {m.requests_per_s:>8.1f} {m.failures_per_s:>7.1f} {m.inferences_per_s:>8.1f} "
                     f"{m.executions_per_s:>8.1f} {_fmt(m.avg_batch, '.2f'):>6} {_fmt(m.queue_ms):>9} "
                     f"{_fmt(m.compute_ms):>10} {_fmt(m.p99_ms):>8} {m.pending:>7.0f}")
        for reason, value in m.failures_by_reason.items():
            lines.append(f"{'':<10}   failed ({reason}): {value:.1f}{unit}")
        for name, value in m.extra.items():
            lines.append(f"{'':<10}   {name}: {value:.2f}")
    for g in report.gpus:
        lines.append(f"GPU {g.gpu}: memory {g.memory_used_bytes / 2**30:.1f} / {g.memory_total_bytes / 2**30:.1f} GiB, "
                     f"utilisation {100 * g.utilization:.0f} %, power {g.power_watts:.0f} W")
    if not report.gpus:
        lines.append("GPU: none reported (no GPU, or the server runs without GPU metrics)")
    if report.cpu_memory_total_bytes:
        lines.append(f"CPU: utilisation {100 * (report.cpu_utilization or 0):.0f} %, memory "
                     f"{(report.cpu_memory_used_bytes or 0) / 2**30:.1f} / {report.cpu_memory_total_bytes / 2**30:.1f} GiB")
    return "\n".join(lines)


def metrics_url(server_url: str, port: int = 8002) -> str:
    """The metrics endpoint of the server at `server_url` (host[:port] or a URL): same host, port `port`."""
    host = server_url.split("://", 1)[-1].split("/", 1)[0]
    if host.startswith("["):  # [IPv6]:port
        host = host[: host.index("]") + 1]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return f"http://{host}:{port}/metrics"


def run(url: str, interval: float, watch: bool, as_json: bool, out=None) -> None:
    """Print stats of the endpoint `url` over `interval` seconds (0: since start); with `watch`, until Ctrl-C."""
    import json
    import sys

    out = out or sys.stdout
    before = scrape(url) if interval > 0 else None
    while True:
        if before is not None:
            time.sleep(interval)
        after = scrape(url)
        report = compute(after, before, url)
        print(json.dumps(report.to_dict()) if as_json else render(report), file=out, flush=True)
        if not watch:
            return
        if not as_json:
            print(file=out)
        before = after
        if interval <= 0:  # --watch needs an interval: fall back to Triton's default 2 s metrics refresh
            interval = 2.0
