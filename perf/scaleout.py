"""Scale-out simulation on one machine: what deploy/kubernetes does, with real parts on loopback ports.

* N Triton replicas (`trident_serving.server`, separate run directories and ports) serving one small model;
* nginx in front as the L7 proxy: gRPC over HTTP/2 (`grpc_pass`) and HTTP, balanced per request;
* a real Prometheus scraping every replica's metrics endpoint with the labels a PodMonitor attaches
  (`namespace`, `pod`), evaluating the Prometheus Adapter rules and KEDA queries of deploy/kubernetes.

Phases (requests per replica always from each server's own `nv_inference_request_success`):
1. the trident client with gRPC client-side round robin (`trident.balancing`, no proxy), which also measures
   the replicas' capacity; a few HTTP requests through nginx;
2. perf_analyzer through nginx offering more than that capacity, open loop, while the autoscaling metric is
   sampled from Prometheus; 3. idle until the metric falls back under the HPA's target;
4. the trident client through nginx while one replica is killed (SIGKILL, a crash): only the requests in
   flight on it may fail.

    python -m perf.scaleout [--replicas 2] [--repository DIR] [--json report.json]

Without `--repository` it exports `yolov8` (python flavour, synthetic weights) into a temporary directory.
Loopback only; every process it starts is stopped at the end.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml

from perf import analyzer
from perf.prometheus import LocalPrometheus
from trident import Client
from trident.balancing import static_target
from trident_serving import server

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
ADAPTER_VALUES = KUBERNETES / "prometheus-adapter" / "values.yaml"
NAMESPACE = "trident"
MODEL = "yolov8"


@dataclass
class ScaleOutOptions:
    replicas: int = 2
    repository: Path | None = None  # holds `yolov8`; None: export one with synthetic weights
    work_dir: Path | None = None  # run dirs, configs and logs; None: a temporary directory
    concurrency: int = 16  # requests in flight in the closed-loop phases (client-side, kill)
    # perf_analyzer offers `overload` x the capacity measured in the client-side phase for `overload_seconds`
    # (at least `load_requests` requests). A closed loop barely queues (dynamic batching takes every waiting
    # request into the next batch); traffic beyond capacity does, which is what should add replicas. The
    # backlog must outlast the rate window, whatever the machine's speed: hence a duration, not a count.
    load_requests: int = 64
    overload: float = 5.0
    overload_seconds: float = 4.0
    client_seconds: float = 4.0  # client-side round-robin phase
    kill_seconds: float = 10.0  # proxy phase during which one replica is killed ...
    kill_after: float = 4.0  # ... this long after it starts
    idle_timeout: float = 30.0  # how long to wait for the metric to fall back when idle
    scrape_interval: str = "1s"
    # The adapter rules use 1-minute rates (two Whisper windows); the simulation keeps everything else and
    # evaluates them over a shorter window so that it fits in a test.
    rate_window: str = "5s"


@dataclass
class Report:
    replicas: int
    requests_per_replica: dict[str, int] = field(default_factory=dict)  # perf_analyzer through nginx
    offered_rate: float = 0.0  # req/s perf_analyzer offered (open loop)
    offered_requests: int = 0  # requests it sent at that rate
    perf_analyzer_throughput: float = 0.0  # infer/s it measured
    client_side_per_replica: dict[str, int] = field(default_factory=dict)  # trident client, round_robin
    http_per_replica: dict[str, int] = field(default_factory=dict)  # trident client over HTTP through nginx
    kill: dict = field(default_factory=dict)  # what happened when a replica died mid-run
    metric: dict = field(default_factory=dict)  # the autoscaling metric: threshold, idle, load, after
    adapter_queries: dict[str, str] = field(default_factory=dict)  # rule name -> PromQL as evaluated
    keda_queries: dict[str, str] = field(default_factory=dict)  # KEDA trigger name -> PromQL as evaluated
    wall_seconds: float = 0.0


# -- processes ----------------------------------------------------------------------------------------------

def wait_for(predicate, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Process:
    """A child process in its own session, stopped (TERM, then KILL) by its own PID."""

    def __init__(self, command: list[str], log: Path, env: dict[str, str] | None = None):
        self.log = log
        with open(log, "wb") as out:
            self.popen = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True)

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()

    def check_alive(self, what: str) -> None:
        if self.popen.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{what} exited with {self.popen.returncode}:\n{tail}")


@dataclass
class Replica:
    name: str  # the pod name Prometheus labels its series with
    options: server.ServerOptions

    def start(self) -> None:
        server.start(self.options)

    def kill(self) -> None:
        """A crash: SIGKILL to the server and its stubs, no draining; returns once its ports are closed."""
        pid = server.running_pid(self.options)
        if pid:
            os.killpg(pid, signal.SIGKILL)
        wait_for(lambda: not port_open(self.options.grpc_port), 10, f"{self.name} to die")

    def stop(self) -> None:
        server.stop(self.options)

    def successes(self, model: str = MODEL) -> int:
        """`nv_inference_request_success` of `model` from this replica's own metrics endpoint."""
        url = f"http://127.0.0.1:{self.options.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        match = re.search(rf'^nv_inference_request_success{{model="{model}"[^}}]*}} (\S+)$', text, re.M)
        return int(float(match.group(1))) if match else 0


NGINX_CONF = """\
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    # Letterboxed images are 4.9 MB per request: no body size limit.
    client_max_body_size 0;
    upstream triton_grpc {{
{grpc_servers}
        keepalive 32;
    }}
    upstream triton_http {{
{http_servers}
        keepalive 32;
    }}
    server {{
        # gRPC clients speak HTTP/2 without TLS (h2c, prior knowledge).
        listen 127.0.0.1:{grpc_port} http2;
        http2_max_requests 1000000;
        location / {{
            grpc_pass grpc://triton_grpc;
            grpc_read_timeout 300s;
            grpc_send_timeout 300s;
            # A replica that refuses the connection is skipped for this request; a request already sent to a
            # replica that dies is not resent (gRPC calls are not idempotent): it fails with UNAVAILABLE.
            grpc_next_upstream error timeout;
            grpc_next_upstream_tries 0;
        }}
    }}
    server {{
        listen 127.0.0.1:{http_port};
        location / {{
            proxy_pass http://triton_http;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 300s;
            # Stream bodies both ways instead of spooling them to temporary files: less latency, and nginx's
            # unprivileged workers may not write into this (private) directory.
            proxy_request_buffering off;
            proxy_buffering off;
        }}
    }}
}}
"""


def settled_successes(replicas: list[Replica], timeout: float = 15.0) -> list[int]:
    """Each replica's success counter once it has stopped moving: a backend reports a request's statistics
    after its response has left, so the counters can lag the client by a moment."""
    counts = [r.successes() for r in replicas]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        again = [r.successes() for r in replicas]
        if again == counts:
            break
        counts = again
    return counts


def nginx_log(work: Path, lines: int = 20) -> str:
    """The end of nginx's error log (why a proxied request failed)."""
    path = work / "nginx" / "error.log"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def start_nginx(replicas: list[Replica], work: Path) -> tuple[Process, int, int]:
    """nginx balancing gRPC (per request) and HTTP over the replicas; returns (process, grpc_port, http_port)."""
    directory = work / "nginx"
    (directory / "tmp").mkdir(parents=True, exist_ok=True)
    grpc_port, http_port = server.free_port(), server.free_port()
    # max_fails=1: one refused connection takes a replica out for fail_timeout (a dead pod stays out).
    line = "        server 127.0.0.1:{} max_fails=1 fail_timeout=30s;"
    conf = NGINX_CONF.format(dir=directory, grpc_port=grpc_port, http_port=http_port,
                             grpc_servers="\n".join(line.format(r.options.grpc_port) for r in replicas),
                             http_servers="\n".join(line.format(r.options.http_port) for r in replicas))
    (directory / "nginx.conf").write_text(conf)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    process = Process([nginx, "-p", str(directory), "-e", str(directory / "error.log"), "-c",
                       str(directory / "nginx.conf"), "-g", "daemon off;"], directory / "stdout.log")
    wait_for(lambda: (process.check_alive("nginx"), port_open(grpc_port))[1], 20, "nginx")
    return process, grpc_port, http_port


def start_prometheus(replicas: list[Replica], work: Path, scrape_interval: str) -> LocalPrometheus:
    """A real Prometheus scraping every replica, labelled as the PodMonitor labels pods; returns once it has
    stored every replica's Triton metrics."""
    prometheus = LocalPrometheus({f"127.0.0.1:{r.options.metrics_port}": {"namespace": NAMESPACE, "pod": r.name}
                                  for r in replicas}, work / "prometheus", scrape_interval)
    wanted = {r.name for r in replicas}
    try:
        wait_for(lambda: {p for p, v in prometheus.query(f'up{{namespace="{NAMESPACE}"}}').items() if v == 1} >= wanted
                 and set(prometheus.query('nv_inference_queue_duration_us{model="%s"}' % MODEL)) >= wanted,
                 60, "Prometheus scrape of every replica", interval=0.5)
    except BaseException:
        prometheus.stop()
        raise
    return prometheus


# -- the adapter rules, as Prometheus Adapter renders them ---------------------------------------------------

@dataclass
class AdapterRule:
    name: str  # the custom metric the HPA asks for
    series: str
    metrics_query: str

    def promql(self, pods: list[str], namespace: str = NAMESPACE, window: str | None = None) -> str:
        """The query the adapter sends for `pods` (its <<.Series>>, <<.LabelMatchers>>, <<.GroupBy>>)."""
        matchers = f'namespace="{namespace}",pod=~"{"|".join(pods)}"'
        query = (self.metrics_query.replace("<<.Series>>", self.series)
                 .replace("<<.LabelMatchers>>", matchers).replace("<<.GroupBy>>", "pod"))
        if "<<" in query:
            raise ValueError(f"rule {self.name}: unsupported template field in {self.metrics_query!r}")
        return query.replace("[1m]", f"[{window}]") if window else query


def adapter_rules(path: Path = ADAPTER_VALUES) -> dict[str, AdapterRule]:
    """The custom rules of the Prometheus Adapter values file, by metric name."""
    rules = {}
    for rule in yaml.safe_load(path.read_text())["rules"]["custom"]:
        series = rule["seriesQuery"].split("{")[0].strip("'\" ")
        name = re.sub(rule["name"]["matches"], rule["name"]["as"], series)
        rules[name] = AdapterRule(name, series, rule["metricsQuery"])
    return rules


def keda_triggers() -> dict[str, tuple[str, float]]:
    """{trigger name: (query, threshold)} of the KEDA ScaledObject as shipped (components/keda)."""
    scaled = yaml.safe_load((KUBERNETES / "components" / "keda" / "scaledobject.yaml").read_text())
    return {t["name"]: (t["metadata"]["query"], float(t["metadata"]["threshold"]))
            for t in scaled["spec"]["triggers"]}


def hpa_targets() -> dict[str, float]:
    """{metric: averageValue} of the HorizontalPodAutoscaler as shipped (components/hpa)."""
    hpa = yaml.safe_load((KUBERNETES / "components" / "hpa" / "hpa.yaml").read_text())
    return {m["pods"]["metric"]["name"]: float(m["pods"]["target"]["averageValue"])
            for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}


# -- load ----------------------------------------------------------------------------------------------------

def run_perf_analyzer(grpc_port: int, rate: float, requests: int) -> float:
    """perf_analyzer over gRPC through the proxy: `requests` requests arriving at `rate` per second, whether or
    not earlier ones have finished (open loop, as independent users send them); returns its throughput."""
    command = [str(analyzer.binary()), "-m", MODEL, "-i", "grpc", "-u", f"127.0.0.1:{grpc_port}",
               "--request-rate-range", f"{rate:.2f}:{rate:.2f}", "--request-count", str(requests),
               # Asynchronous: in its default synchronous mode each of its 4 threads waits for its answer, which
               # caps the requests outstanding at 4 and turns the open loop into a closed one.
               "--async"]
    result = subprocess.run(command, capture_output=True, text=True, env=analyzer.environment(), timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed ({result.returncode}):\n{result.stdout[-3000:]}{result.stderr}")
    match = re.search(r"Throughput: ([\d.]+) infer/sec", result.stdout)
    return float(match.group(1)) if match else 0.0


@dataclass
class Outcome:
    start: float
    end: float
    ok: bool
    error: str = ""


def client_load(url: str, concurrency: int, seconds: float, at: float | None = None, action=None,
                requests: int | None = None) -> list[Outcome]:
    """`concurrency` threads sending `yolov8` requests with the trident client for `seconds` (or until
    `requests` have been sent); `action()` runs `at` seconds in (e.g. killing a replica). Every request's
    start, end and outcome, on one monotonic clock."""
    client = Client(url, timeout=60)
    image = np.random.default_rng(0).random((1, 3, 640, 640), dtype=np.float32)
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    start = time.monotonic()
    stop_at = start + seconds
    budget = [requests] if requests is not None else None  # requests left to send, shared by the threads

    def worker() -> None:
        while True:
            with lock:
                if budget is not None:
                    if budget[0] <= 0:
                        return
                    budget[0] -= 1
                elif time.monotonic() >= stop_at:
                    return
            t0 = time.monotonic()
            try:
                client.infer(MODEL, {"images": image}, ["output0"])
                outcome = Outcome(t0, time.monotonic(), True)
            except Exception as exc:  # noqa: BLE001 - every failure is recorded, none is fatal here
                outcome = Outcome(t0, time.monotonic(), False, f"{type(exc).__name__}: {exc}"[:300])
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    if action is not None:
        time.sleep(max(0.0, start + at - time.monotonic()))
        action()
    for thread in threads:
        thread.join(seconds + 120)
    return outcomes


def hpa_value(prometheus: LocalPrometheus, query: str) -> float:
    """The metric as the HPA compares it with an AverageValue target: the mean over the pods reporting it."""
    values = list(prometheus.query(query).values())
    return sum(values) / len(values) if values else 0.0


class MetricWatcher:
    """Samples a metric (`measure()`, e.g. `hpa_value` of a query) while load runs."""

    def __init__(self, measure, interval: float = 0.5):
        self.measure, self.interval = measure, interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.measure())
            self._stop.wait(self.interval)

    def __enter__(self) -> "MetricWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def export_repository(target: Path) -> Path:
    """`yolov8` alone (python flavour, synthetic weights): the cheapest real model of the repository."""
    subprocess.run([sys.executable, "-m", "export", "yolo", "--weights", "synthetic", "--flavour", "python",
                    "--repo", str(target)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return target


def only_model(source: Path, target: Path, model: str = MODEL) -> Path:
    """A repository holding just `model`, copied from `source`."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source / model, target / model, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    return target


# -- the run -------------------------------------------------------------------------------------------------

def run(options: ScaleOutOptions, log=print) -> Report:
    """Run every phase and return the measured figures (raises if a part cannot start)."""
    began = time.monotonic()
    with ExitStack() as stack:
        work = options.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="scaleout-")))
        work.mkdir(parents=True, exist_ok=True)
        source = options.repository or export_repository(work / "export")
        repository = only_model(source, work / "repository")
        replicas = [Replica(f"trident-sim-{i}", server.on_free_ports(
            repository=repository, run_dir=work / f"replica-{i}", ready_timeout=180)) for i in range(options.replicas)]
        for replica in replicas:
            stack.callback(replica.stop)
        # Start them together: each load is mostly waiting on its stub.
        errors: list[BaseException] = []
        starters = [threading.Thread(target=lambda r=r: _collect(errors, r.start)) for r in replicas]
        for thread in starters:
            thread.start()
        for thread in starters:
            thread.join()
        if errors:
            raise errors[0]
        log(f"{len(replicas)} replicas ready: gRPC ports {[r.options.grpc_port for r in replicas]}")
        nginx, grpc_port, http_port = start_nginx(replicas, work)
        stack.callback(nginx.stop)
        prometheus = start_prometheus(replicas, work, options.scrape_interval)
        stack.callback(prometheus.stop)
        log(f"nginx gRPC :{grpc_port} HTTP :{http_port}, Prometheus :{prometheus.port}")

        report = Report(replicas=len(replicas))
        rules = adapter_rules()
        pods = [r.name for r in replicas]
        report.adapter_queries = {name: rule.promql(pods, window=options.rate_window)
                                  for name, rule in rules.items()}
        # The KEDA queries select pods by name (trident-...) in namespace trident: the simulated pods match.
        report.keda_queries = {name: query.replace("[1m]", f"[{options.rate_window}]")
                               for name, (query, _) in keda_triggers().items()}
        for query in [*report.adapter_queries.values(), *report.keda_queries.values()]:
            prometheus.query(query)  # every rule is valid PromQL against live Triton series
        metric_name = "trident_queued_requests"
        threshold = hpa_targets()[metric_name]
        query = report.adapter_queries[metric_name]
        idle_before = hpa_value(prometheus, query)

        # 1. client-side balancing: gRPC round_robin over the replicas' own addresses, no proxy. Closed loop:
        #    it also measures what the replicas serve together, which sets the offered load of phase 2.
        before = settled_successes(replicas)
        target = static_target([f"127.0.0.1:{r.options.grpc_port}" for r in replicas])
        outcomes = client_load(target, options.concurrency, options.client_seconds)
        after = settled_successes(replicas)
        report.client_side_per_replica = {r.name: a - b for r, a, b in zip(replicas, after, before)}
        failed = [o for o in outcomes if not o.ok]
        if failed:
            raise RuntimeError(f"client-side balancing: {len(failed)} failures, e.g. {failed[0].error}")
        capacity = len(outcomes) / (max(o.end for o in outcomes) - min(o.start for o in outcomes))
        log(f"client-side round_robin ({target}): {capacity:.1f} req/s, per replica "
            f"{report.client_side_per_replica}")

        # HTTP through the proxy too: nginx balances each HTTP/1.1 request over its keep-alive upstreams.
        before = settled_successes(replicas)
        outcomes = client_load(f"http://127.0.0.1:{http_port}", 1, 0.0, requests=2 * len(replicas))
        after = settled_successes(replicas)
        report.http_per_replica = {r.name: a - b for r, a, b in zip(replicas, after, before)}
        if not all(o.ok for o in outcomes):
            raise RuntimeError(f"HTTP through nginx failed: {[o.error for o in outcomes if not o.ok][:1]}; "
                               f"nginx error log:\n{nginx_log(work)}")
        log(f"HTTP via nginx: per replica {report.http_per_replica}")

        # 2. perf_analyzer through the proxy, offering 5x that capacity: queues build on every replica, as
        #    when traffic outgrows a Deployment; then it stops and they drain.
        report.offered_rate = round(options.overload * capacity, 2)
        report.offered_requests = max(options.load_requests,
                                      math.ceil(report.offered_rate * options.overload_seconds))
        before = settled_successes(replicas)
        # KEDA (metricType AverageValue) divides the query's single value by the replica count.
        keda_query = report.keda_queries["queued-requests"]
        keda_measure = lambda: sum(prometheus.query(keda_query).values()) / len(replicas)  # noqa: E731
        with MetricWatcher(lambda: hpa_value(prometheus, query)) as watcher, \
                MetricWatcher(keda_measure) as keda_watcher:
            report.perf_analyzer_throughput = run_perf_analyzer(grpc_port, report.offered_rate,
                                                                report.offered_requests)
        after = settled_successes(replicas)
        report.requests_per_replica = {r.name: a - b for r, a, b in zip(replicas, after, before)}
        log(f"perf_analyzer via nginx, {report.offered_requests} requests at {report.offered_rate} req/s: "
            f"{report.perf_analyzer_throughput:.1f} infer/s, per replica {report.requests_per_replica}")
        load_peak = max(watcher.samples or [0.0])
        above = sum(v > threshold for v in watcher.samples) * watcher.interval

        # 3. idle: every request has been answered; the metric falls back below the target.
        start = time.monotonic()
        idle_after = hpa_value(prometheus, query)
        while idle_after >= threshold and time.monotonic() - start < options.idle_timeout:
            time.sleep(0.5)
            idle_after = hpa_value(prometheus, query)
        waited = time.monotonic() - start
        report.metric = {"name": metric_name, "threshold": threshold, "window": options.rate_window,
                         "idle_before": idle_before, "load_peak": load_peak, "seconds_above_threshold": above,
                         # The HPA's rule: desired = ceil(current x value / target), before behaviour limits.
                         "hpa_desired_replicas_at_peak": math.ceil(len(replicas) * load_peak / threshold),
                         "keda_threshold": keda_triggers()["queued-requests"][1],
                         "keda_load_peak": max(keda_watcher.samples or [0.0]),
                         "idle_after": idle_after, "seconds_to_fall_back": round(waited, 1)}
        log(f"{metric_name}: idle {idle_before:.2f}, peak under load {load_peak:.2f} (threshold {threshold}, "
            f"above it for {above:.1f} s), back to {idle_after:.2f} {waited:.1f} s after the load ended")

        # 4. a replica crashes mid-run behind the proxy.
        victim, survivors = replicas[-1], replicas[:-1]
        killed_at: list[float] = []  # when the kill was sent, when the victim's ports were closed
        before = settled_successes(survivors)

        def kill() -> None:
            killed_at.append(time.monotonic())
            victim.kill()
            killed_at.append(time.monotonic())

        outcomes = client_load(f"127.0.0.1:{grpc_port}", options.concurrency, options.kill_seconds,
                               at=options.kill_after, action=kill)
        after = settled_successes(survivors)
        # In flight at the kill: sent before the victim was gone, still unanswered when the kill was sent.
        t_kill, t_dead = killed_at
        failed = [o for o in outcomes if not o.ok]
        later = [o for o in outcomes if o.start > t_dead]
        report.kill = {
            "killed": victim.name,
            "seconds_to_die": round(t_dead - t_kill, 3),
            "requests": len(outcomes),
            "failed": len(failed),
            "failed_in_flight_at_kill": sum(o.start <= t_dead and o.end >= t_kill for o in failed),
            "failed_started_after_kill": sum(o.start > t_dead for o in failed),
            "started_after_kill": len(later),
            "succeeded_after_kill": sum(o.ok for o in later),
            "survivor_requests": sum(a - b for a, b in zip(after, before)),
            "errors": sorted({o.error for o in failed})[:3],
        }
        log(f"kill {victim.name} at +{options.kill_after:.0f}s: {report.kill}")

        report.wall_seconds = round(time.monotonic() - began, 1)
        return report


def _collect(errors: list[BaseException], call) -> None:
    try:
        call()
    except BaseException as exc:  # noqa: BLE001 - re-raised by the caller after every thread has finished
        errors.append(exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = ScaleOutOptions()
    parser.add_argument("--replicas", type=int, default=defaults.replicas)
    parser.add_argument("--repository", type=Path, help="a repository with yolov8 (default: export one)")
    parser.add_argument("--work-dir", type=Path, help="keep configs and logs here (default: temporary)")
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--load-requests", type=int, default=defaults.load_requests)
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    if args.replicas < 2:
        parser.error("--replicas must be at least 2 (one of them is killed)")
    options = ScaleOutOptions(replicas=args.replicas, repository=args.repository, work_dir=args.work_dir,
                              concurrency=args.concurrency, load_requests=args.load_requests)
    report = run(options)
    text = json.dumps(asdict(report), indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
