"""Monitoring against the real server: Prometheus (Debian's package) scraping the test server while requests
flow, every expression of the Grafana dashboard answered by Prometheus' HTTP API, Trident's model-level
metrics equal to what the test sent, and `trident stats` showing the batching.

The dashboard's panels are also rendered from this run's Prometheus data into a PNG; with
TRIDENT_DASHBOARD_PNG=path, into that file (how docs/dashboard.png is made; see the README, "Monitoring").
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from ultralytics.utils import ASSETS

from perf.prometheus import LocalPrometheus, PrometheusError
from perf.prometheus import binary as prometheus_binary
from trident import InvalidInputError
from trident import stats as trident_stats

from conftest import ALL_MODELS, DATA, ROOT, detect_gathering, selected_models

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "trident.json"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
RATE_WINDOW = "30s"  # stands for Grafana's $__rate_interval: covers the whole traffic burst at 1 s scrapes
# Which model's export an expression's metrics need, by metric name prefix (others: every server has them).
NEEDS = {"trident_detect_": "yolo", "trident_easyocr_": "easyocr", "trident_whisper_": "whisper"}
SERVED = {"yolo": ("detect", "yolov8"), "easyocr": ("easyocr",), "whisper": ("whisper",)}  # models of an export
DETECT_IMAGES = 16
STATS_BURST = 8  # detect requests, all in flight at once
OCR_IMAGES = ["ocr_en_sign.jpg", "ocr_ko_mixed.png", "ocr_en_sizes.png", "ocr_banner_wide.png"]
WHISPER_SECONDS = (1.5, 2.5)  # two short clips decoded greedily: the cheapest real traffic


def need(tool: str) -> str:
    try:
        return prometheus_binary(tool)
    except PrometheusError as exc:
        pytest.fail(str(exc))


def test_promtool_accepts_the_shipped_config():
    result = subprocess.run([need("promtool"), "check", "config", str(PROMETHEUS_CONFIG)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    # The compose service names Triton `triton`; its metrics port inside the container is 8002.
    assert '"triton:8002"' in PROMETHEUS_CONFIG.read_text()


def test_compose_provisions_prometheus_and_grafana():
    """The compose services mount what the provisioning files point at: no clicking in Grafana."""
    import yaml

    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    grafana = ROOT / "deploy" / "grafana"
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    assert any(a.startswith("--storage.tsdb.retention.time=") for a in services["prometheus"]["command"])
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in services["grafana"]["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((grafana / "provisioning" / "dashboards" / "trident.yml").read_text())["providers"][0]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    source = yaml.safe_load((grafana / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    env = services["grafana"]["environment"]
    assert "GRAFANA_ADMIN_PASSWORD" in env["GF_SECURITY_ADMIN_PASSWORD"]  # from .env
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "${GRAFANA_ANONYMOUS:-false}"
    dotenv = dict(line.split("=", 1) for line in (ROOT / ".env").read_text().splitlines() if "=" in line
                  and not line.startswith("#"))
    assert dotenv["GRAFANA_ANONYMOUS"] == "false" and dotenv["GRAFANA_ADMIN_PASSWORD"]


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of the dashboard, Grafana variables substituted."""
    found = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", RATE_WINDOW).replace("$model", ".*")
            assert "$" not in expr, f"unsubstituted variable in {panel['title']!r}: {expr}"
            found.append((panel["title"], expr))
    return found


def test_dashboard_covers_the_issue():
    """Panels the dashboard must have (and Triton's own dashboard lacks): batch size, percentiles, failures."""
    exprs = " ".join(e for _, e in dashboard_expressions())
    for needle in ["nv_inference_count", "nv_inference_exec_count", 'quantile="0.99"', 'quantile="0.5"',
                   "nv_inference_request_failure", "nv_inference_pending_request_count",
                   "nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us",
                   "nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes",
                   "nv_gpu_power_usage", "nv_cpu_utilization", "nv_cpu_memory_used_bytes"]:
        assert needle in exprs, needle
    from trident_serving.metrics import CATALOGUE

    for spec in CATALOGUE:
        assert spec.name in exprs, f"{spec.name} has no panel"


@pytest.mark.parametrize("server, expected", [
    ("localhost", "http://localhost:8002/metrics"),
    ("grpc://gpu-host:8001", "http://gpu-host:8002/metrics"),
    ("http://10.0.0.5:8000/", "http://10.0.0.5:8002/metrics"),
    ("[::1]:8001", "http://[::1]:8002/metrics"),
])
def test_stats_finds_the_metrics_endpoint_of_a_server_url(server, expected):
    assert trident_stats.metrics_url(server) == expected


def test_stats_arithmetic_between_two_scrapes():
    """Rates, batch, per-request times, p99, error codes and GPU memory from two expositions 2 s apart."""
    def exposition(success, count, executions, queue_us, infer_us, errors, crops, batches):
        return f"""# TYPE nv_inference_request_success counter
nv_inference_request_success{{model="easyocr",version="1"}} {success}
# TYPE nv_inference_request_failure counter
nv_inference_request_failure{{model="easyocr",reason="REJECTED",version="1"}} 0
# TYPE nv_inference_count counter
nv_inference_count{{model="easyocr",version="1"}} {count}
# TYPE nv_inference_exec_count counter
nv_inference_exec_count{{model="easyocr",version="1"}} {executions}
# TYPE nv_inference_queue_duration_us counter
nv_inference_queue_duration_us{{model="easyocr",version="1"}} {queue_us}
# TYPE nv_inference_compute_infer_duration_us counter
nv_inference_compute_infer_duration_us{{model="easyocr",version="1"}} {infer_us}
# TYPE nv_inference_request_summary_us summary
nv_inference_request_summary_us_count{{model="easyocr",version="1"}} {success}
nv_inference_request_summary_us_sum{{model="easyocr",version="1"}} 1
nv_inference_request_summary_us{{model="easyocr",version="1",quantile="0.99"}} 250000
# TYPE trident_request_errors_total counter
trident_request_errors_total{{code="INVALID_ARG",model="easyocr",version="1"}} {errors}
# TYPE trident_easyocr_batch_text_crops histogram
trident_easyocr_batch_text_crops_count{{model="easyocr",version="1"}} {batches}
trident_easyocr_batch_text_crops_sum{{model="easyocr",version="1"}} {crops}
trident_easyocr_batch_text_crops_bucket{{model="easyocr",version="1",le="+Inf"}} {batches}
# TYPE trident_whisper_engine_info gauge
trident_whisper_engine_info{{compute_type="int8_float32",engine="ctranslate2",model="easyocr",version="1"}} 1
# TYPE nv_gpu_memory_used_bytes gauge
nv_gpu_memory_used_bytes{{gpu_uuid="GPU-0"}} 2147483648
# TYPE nv_gpu_memory_total_bytes gauge
nv_gpu_memory_total_bytes{{gpu_uuid="GPU-0"}} 85899345920
"""
    before = trident_stats.parse(exposition(10, 10, 10, 1000, 50000, 0, 30, 10), at=100.0)
    after = trident_stats.parse(exposition(30, 30, 15, 41000, 250000, 2, 90, 15), at=102.0)
    report = trident_stats.compute(after, before, "url")
    (m,) = report.models
    assert (m.requests_per_s, m.inferences_per_s, m.executions_per_s) == (10.0, 10.0, 2.5)
    assert m.avg_batch == 4.0 and m.queue_ms == 2.0 and m.compute_ms == 10.0 and m.p99_ms == 250.0
    assert m.failures_by_reason == {"answered INVALID_ARG": 1.0} and m.failures_per_s == 1.0
    assert m.extra == {"trident_easyocr_batch_text_crops (average)": 12.0,  # and a gauge by its own labels:
                       "trident_whisper_engine_info{compute_type=int8_float32,engine=ctranslate2}": 1.0}
    assert report.gpus[0].memory_used_bytes == 2 * 2**30
    text = trident_stats.render(report)
    assert "over the last 2.0 s" in text and "memory 2.0 / 80.0 GiB" in text


def test_dashboard_is_well_formed():
    """Unique panel ids, panels inside Grafana's 24-column grid without overlapping, one data source variable."""
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    taken: dict = {}
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, panel["title"]
        for cell in ((x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])):
            assert cell not in taken, f"{panel['title']!r} overlaps {taken[cell]!r}"
            taken[cell] = panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource", "model"]


@pytest.fixture(scope="module")
def traffic(triton, tmp_path_factory):
    """Prometheus started, then every exported model's traffic sent while it scrapes.

    Returns (prometheus, metrics before, metrics after, what was sent)."""
    need("prometheus")
    prometheus = LocalPrometheus({f"127.0.0.1:{triton.options.metrics_port}": {}},
                                 tmp_path_factory.mktemp("prometheus"))
    try:
        deadline = time.monotonic() + 20
        while prometheus.query('up{job="triton"}', label="job") != {"triton": 1.0}:
            assert time.monotonic() < deadline, "prometheus never scraped the test server"
            time.sleep(0.5)
        url = f"http://127.0.0.1:{triton.options.metrics_port}/metrics"
        prometheus.started = time.time()
        before = trident_stats.scrape(url)
        client = triton.client("grpc")
        models = selected_models()
        with ThreadPoolExecutor(3) as pool:
            jobs = {}
            if "yolo" in models:
                images = [ASSETS / name for name in ("bus.jpg", "zidane.jpg")] * (DETECT_IMAGES // 2)
                jobs["detect"] = pool.submit(client.detect_many, images, concurrency=8)
            if "easyocr" in models:
                jobs["easyocr"] = pool.submit(client.read_text_many, [DATA / n for n in OCR_IMAGES], concurrency=4)
            if "whisper" in models:
                rng = np.random.default_rng(0)
                clips = [(0.1 * rng.standard_normal(int(16000 * s))).astype(np.float32) for s in WHISPER_SECONDS]
                jobs["whisper"] = pool.submit(client.transcribe_many, clips, temperature=[0.0], concurrency=2)
            sent = {name: job.result() for name, job in jobs.items()}
        if "yolo" in models:
            with pytest.raises(InvalidInputError):  # one failure for the failure panels
                client.detect(b"not an image")
        time.sleep(3)  # a few more scrapes after the last request (Triton refreshes CPU metrics every 2 s)
        after = trident_stats.scrape(url)
        yield prometheus, before, after, sent
    finally:
        prometheus.stop()


def delta(before, after, name: str, **labels) -> float:
    return after.total(name, **labels) - before.total(name, **labels)


@pytest.mark.yolo
def test_every_dashboard_expression_returns_series(traffic):
    prometheus, _, _, _ = traffic
    models = selected_models()
    empty, checked = [], 0
    for title, expr in dashboard_expressions():
        answer = prometheus.api("query", query=expr)
        assert answer["status"] == "success", f"{title!r}: {expr}: {answer.get('error')}"
        needs = [model for prefix, model in NEEDS.items() if prefix in expr]
        if "nv_gpu_" in expr or any(model not in models for model in needs):
            continue  # no GPU here / that model is not exported in this run: valid syntax is all we can check
        checked += 1
        if not answer["data"]["result"]:
            empty.append(f"{title!r}: {expr}")
    assert not empty, "expressions without a series:\n" + "\n".join(empty)
    assert checked >= 20


@pytest.mark.yolo
def test_detect_images_per_bls_call(traffic):
    _, before, after, sent = traffic
    assert len(sent["detect"]) == DETECT_IMAGES
    images = delta(before, after, "trident_detect_bls_call_images_sum", model="detect")
    calls = delta(before, after, "trident_detect_bls_call_images_count", model="detect")
    executions = delta(before, after, "nv_inference_exec_count", model="detect")
    assert images == DETECT_IMAGES  # the bad image failed before the BLS call...
    # ...alone (sent after the others were answered), in an execution calling nothing; every other execution
    # makes one call per letterboxed shape: bus.jpg's (640x480), zidane.jpg's (384x640) or both
    assert executions - 1 <= calls <= 2 * (executions - 1)
    # Each BLS call is one yolov8 request carrying its images; Triton may batch the calls of the two detect
    # instances into one yolov8 execution.
    assert delta(before, after, "nv_inference_request_success", model="yolov8") == calls
    assert delta(before, after, "nv_inference_count", model="yolov8") == images
    assert 1 <= delta(before, after, "nv_inference_exec_count", model="yolov8") <= calls
    # The bad image was answered INVALID_ARG by the model: Triton counts it a success, Trident an error.
    assert delta(before, after, "nv_inference_request_success", model="detect") == DETECT_IMAGES + 1
    assert delta(before, after, "trident_request_errors_total", model="detect", code="INVALID_ARG") == 1
    assert delta(before, after, "trident_request_errors_total", model="detect") == 1


@pytest.mark.yolo
@pytest.mark.easyocr
def test_easyocr_text_crops_per_batch(traffic):
    _, before, after, sent = traffic
    lines = sum(len(result) for result in sent["easyocr"])
    assert lines > len(OCR_IMAGES)  # not vacuous: the synthetic recogniser reads boxes on these images
    assert delta(before, after, "trident_easyocr_batch_text_crops_sum", model="easyocr") == lines
    assert delta(before, after, "trident_easyocr_batch_text_crops_count", model="easyocr") == \
        delta(before, after, "nv_inference_exec_count", model="easyocr")


@pytest.mark.yolo
def test_trident_stats_shows_the_batching(triton):
    """`trident stats --watch --json` over a burst of concurrent requests gathered into one execution, then the
    table since start."""
    url = f"http://127.0.0.1:{triton.options.metrics_port}/metrics"
    cli = str(Path(sys.executable).parent / "trident")
    client = triton.client("grpc")
    rows = []  # detect's line of each report from the burst on
    # the burst runs as one execution, for certain; every scrape sees one loaded copy of `detect`
    with detect_gathering(triton, STATS_BURST, seconds=30):
        watch = subprocess.Popen([cli, "stats", "--metrics-url", url, "--interval", "1", "--watch", "--json"],
                                 stdout=subprocess.PIPE, text=True)
        try:
            json.loads(watch.stdout.readline())  # the first interval is over: what follows sees the burst
            client.detect_many([ASSETS / "bus.jpg"] * STATS_BURST, concurrency=STATS_BURST)
            while sum(m["inferences_per_s"] * m["seconds"] for m in rows) < STATS_BURST - 0.5 and len(rows) < 120:
                report = json.loads(watch.stdout.readline())  # one per second, queued in the pipe meanwhile
                rows += [{**m, "seconds": report["seconds"]} for m in report["models"] if m["model"] == "detect"]
        finally:
            watch.terminate()
            watch.wait(timeout=10)
        table = subprocess.run([cli, "stats", "--metrics-url", url, "--interval", "0"], capture_output=True,
                               text=True, check=True).stdout
    inferences = sum(m["inferences_per_s"] * m["seconds"] for m in rows)
    executions = sum(m["executions_per_s"] * m["seconds"] for m in rows)
    assert (round(inferences), round(executions)) == (STATS_BURST, 1)
    assert any(m["avg_batch"] and m["avg_batch"] > 1 for m in rows)
    assert any(m["extra"].get("trident_detect_bls_call_images (average)", 0) > 1 for m in rows)

    print(table)
    lines = table.splitlines()
    header = lines[1].split()
    row = next(line.split() for line in lines if line.startswith("detect "))
    assert float(row[header.index("batch")]) > 1
    gpus = trident_stats.scrape(url).label_values("nv_gpu_memory_total_bytes", "gpu_uuid")
    gpu_lines = [line for line in lines if line.startswith("GPU")]
    if gpus:
        assert [line.split(":")[0] for line in gpu_lines] == [f"GPU {uuid}" for uuid in gpus]
        assert all(re.search(r"memory \d+\.\d / \d+\.\d GiB", line) for line in gpu_lines)
    else:
        assert gpu_lines == ["GPU: none reported (no GPU, or the server runs without GPU metrics)"]
    assert re.fullmatch(r"CPU: utilisation \d+ %, memory \d+\.\d / [1-9]\d*\.\d GiB", lines[-1])


@pytest.mark.yolo
@pytest.mark.whisper
def test_whisper_worker_metrics(traffic):
    """The continuous-batching worker, invisible to Triton's timing, seen through its own metrics."""
    _, before, after, sent = traffic
    assert len(sent["whisper"]) == len(WHISPER_SECONDS)
    audio = delta(before, after, "trident_whisper_transcribed_audio_seconds_total", model="whisper")
    assert audio == pytest.approx(sum(WHISPER_SECONDS), abs=0.02)
    steps = delta(before, after, "trident_whisper_step_windows_count", model="whisper")
    windows = delta(before, after, "trident_whisper_step_windows_sum", model="whisper")
    assert windows == len(WHISPER_SECONDS)  # each clip is one 30 s window, decoded once (no fallback, below)
    assert 1 <= steps <= len(WHISPER_SECONDS)  # together, or one after the other
    assert delta(before, after, "trident_whisper_temperature_fallbacks_total", model="whisper") == 0  # greedy only
    assert after.total("trident_whisper_active_transcriptions", model="whisper") == 0  # all answered
    assert after.total("trident_whisper_queued_audio_seconds", model="whisper") == 0
    # which engine serves: the session's synthetic export, openai-whisper on one CPU instance
    assert after.total("trident_whisper_engine_info", model="whisper", engine="openai", compute_type="float32") == 1


@pytest.mark.yolo
def test_render_dashboard_png(traffic, triton, tmp_path):
    """The dashboard's panels drawn with matplotlib from this run's Prometheus data (runs last in the module:
    both bursts of traffic above are in the picture); into TRIDENT_DASHBOARD_PNG when set (docs/dashboard.png).
    Every panel draws at least the series this run's traffic must give it."""
    prometheus = traffic[0]
    time.sleep(5)  # a few idle scrapes after the last burst
    path = Path(os.environ.get("TRIDENT_DASHBOARD_PNG") or tmp_path / "dashboard.png")
    start, end = prometheus.started - 5, time.time()
    drawn = render_dashboard(dashboard_series(prometheus, start, end), start, end, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not missing_series(drawn, expected_series(selected_models(), f"127.0.0.1:{triton.options.metrics_port}"))


def test_the_series_check_fails_on_an_empty_prometheus(tmp_path):
    """The check above fails for every panel that expects a series when Prometheus holds no data at all (what
    dashboard_series finds is what render_dashboard draws: nothing to draw here)."""
    need("prometheus")
    prometheus = LocalPrometheus({}, tmp_path / "prometheus")
    try:
        now = time.time()
        series = dashboard_series(prometheus, now - 60, now)
    finally:
        prometheus.stop()
    expected = expected_series(list(ALL_MODELS), "127.0.0.1:8002")
    drawn = {title: [label for label, _, _ in found] for title, found in series.items()}
    assert missing_series(drawn, expected) == {title: labels for title, labels in expected.items() if labels}


def expected_series(models: list[str], target: str) -> dict[str, set[str]]:
    """Per panel title, the series (legend labels) the module's traffic to `models` on the server scraped at
    `target` must make it draw (its detect traffic included: the tests drawing need yolo)."""
    served = [name for model, names in SERVED.items() if model in models for name in names]

    def each(label: str) -> set[str]:
        return {label.format(name) for name in served}

    inside = {"yolo": "detect: images per BLS call", "easyocr": "easyocr: text crops per batch",
              "whisper": "whisper: windows per step"}
    # Not expected: pending requests and whisper's gauges (a queue may fall between two scrapes), fallbacks
    # (greedy decoding only), GPU panels (none on a CPU server).
    return {
        "Requests / s (all models)": {"requests/s"},
        "Failed requests (share)": {"failed"},
        "Models serving": {"models"},
        "Triton scrape up": {target},
        "Request rate": each("{}"),
        "Failures by reason": {"detect answered INVALID_ARG"},  # the traffic's bad image
        "Request latency p50 / p95 / p99": each("{} p50") | each("{} p95") | each("{} p99"),
        "Queue vs compute (per request)": each("{} queue") | each("{} input") | each("{} infer") | each("{} output"),
        "Queue p99 vs compute p99": each("{} queue p99") | each("{} infer p99"),
        "Average batch size": each("{}"),
        "Inferences vs executions": each("{} inferences/s") | each("{} executions/s"),
        "Average request latency": each("{}"),
        **{title: {"average", "p95"} for model, title in inside.items() if model in models},
        "whisper: audio transcribed per second": {"audio s / s"} if "whisper" in models else set(),
        "CPU utilisation": {"CPU"},
        "Memory used vs total": {"used", "total"},
    }


def missing_series(drawn: dict[str, list[str]], expected: dict[str, set[str]]) -> dict[str, set[str]]:
    """The expected series a panel did not draw, by panel title (panels that drew them all left out)."""
    missing = {title: labels - set(drawn.get(title, [])) for title, labels in expected.items()}
    return {title: labels for title, labels in missing.items() if labels}


Series = tuple[str, np.ndarray, np.ndarray]  # legend label, seconds since start, values


def dashboard_series(prometheus: LocalPrometheus, start: float, end: float) -> dict[str, list[Series]]:
    """Per panel title (rows left out), the series its queries give over [start, end] that are worth drawing:
    all of a stat panel's, a time series panel's unless all zero (e.g. failure reasons that never happened)."""
    found = {}
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        if panel["type"] == "row":
            continue
        found[panel["title"]] = []
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "15s").replace("$model", ".*")
            answer = prometheus.api("query_range", query=expr, start=start, end=end, step=2)
            for series in answer.get("data", {}).get("result", []):
                t = np.array([float(v[0]) for v in series["values"]]) - start
                y = np.array([float(v[1]) for v in series["values"]])
                label = re.sub(r"{{(\w+)}}", lambda m: series["metric"].get(m.group(1), ""), target["legendFormat"])
                if panel["type"] == "stat" or np.nan_to_num(y).any():
                    found[panel["title"]].append((label, t, y))
    return found


def render_dashboard(series: dict[str, list[Series]], start: float, end: float, path: Path) -> dict[str, list[str]]:
    """Lay the panels out on Grafana's 24-column grid and plot each one's `series` over [start, end] into the PNG
    `path`; returns the labels drawn, by panel title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = json.loads(DASHBOARD.read_text())["panels"]
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    unit_h = 0.36  # inches per grid row
    fig = plt.figure(figsize=(24, bottom * unit_h + 0.8), facecolor="#111217")
    fig.suptitle(f"Trident dashboard: Prometheus data of a test run ({time.strftime('%Y-%m-%d', time.gmtime(end))}, "
                 "local CPU server, synthetic weights; rendered by tests/test_monitoring.py)",
                 color="#d8d9da", fontsize=13, x=0.01, ha="left")
    top = 1 - 0.8 / (bottom * unit_h + 0.8)
    drawn = {}
    for panel in panels:
        g = panel["gridPos"]
        box = [g["x"] / 24 + 0.003, top - (g["y"] + g["h"]) / bottom * top + 0.004, g["w"] / 24 - 0.006,
               g["h"] / bottom * top - 0.008]
        if panel["type"] == "timeseries":  # room for tick labels inside the panel
            box = [box[0] + 0.022, box[1] + 0.012, box[2] - 0.026, box[3] - 0.024]
        if panel["type"] == "row":
            fig.text(box[0], box[1] + box[3] / 2, panel["title"], color="#d8d9da", fontsize=12, weight="bold",
                     va="center")
            continue
        ax = fig.add_axes(box, facecolor="#181b1f")
        ax.set_title(panel["title"], color="#d8d9da", fontsize=9, loc="left")
        ax.tick_params(colors="#8e8e8e", labelsize=7)
        for spine in ax.spines.values():
            spine.set_color("#2c3235")
        unit = panel["fieldConfig"]["defaults"].get("unit", "")
        drawn[panel["title"]] = []
        for label, t, y in series[panel["title"]]:
            if panel["type"] == "stat":
                last = y[np.isfinite(y)][-1] if np.isfinite(y).any() else float("nan")
                text = f"{100 * last:.1f} %" if unit == "percentunit" else f"{last:.3g}"
                ax.text(0.5, 0.45, text, color="#73bf69", fontsize=22, ha="center", va="center",
                        transform=ax.transAxes)
            else:
                ax.plot(t, y, linewidth=1.2, label=label)
            drawn[panel["title"]].append(label)
        if panel["type"] == "stat":
            ax.set_xticks([])
            ax.set_yticks([])
        elif drawn[panel["title"]]:
            ax.set_xlim(0, end - start)
            ax.set_xlabel("seconds", color="#8e8e8e", fontsize=7)
            ax.set_ylabel(unit, color="#8e8e8e", fontsize=7)
            ax.legend(fontsize=6, loc="upper right", facecolor="#181b1f", labelcolor="#d8d9da", framealpha=0.6)
        if not drawn[panel["title"]]:
            reason = "no GPU on this machine" if "GPU" in panel["title"] else "zero throughout this run"
            ax.text(0.5, 0.5, reason, color="#8e8e8e", fontsize=9, ha="center", va="center", transform=ax.transAxes)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, facecolor=fig.get_facecolor())
    plt.close(fig)
    return drawn
