"""Scale-out simulation on one machine: what deploy/kubernetes does, with real parts on loopback ports.

* N Triton replicas (`trident_serving.server`, separate run directories and ports) serving `yolov8`, which takes
  the load; the first also loads `whisper` (tiny) during the sequential checks, for the worker gauge the
  Whisper autoscaling rules read;
* nginx in front as the L7 proxy: gRPC over HTTP/2 (`grpc_pass`) and HTTP, balanced per request;
* a real Prometheus scraping every replica's metrics endpoint with the labels a PodMonitor attaches
  (`namespace`, `pod`), evaluating the Prometheus Adapter rules and KEDA queries of deploy/kubernetes.

Phases (requests per replica always from each server's own `nv_inference_request_success`):
1. sequential requests: one gRPC channel of the trident client with client-side round robin
   (`trident.balancing`, no proxy), and HTTP through nginx; then the trident client from many threads with
   client-side round robin, which also measures the replicas' capacity;
2. perf_analyzer through nginx offering more than that capacity, open loop; meanwhile every Prometheus Adapter
   and KEDA query is evaluated, each result recorded;
3. idle until the autoscaling metric falls back under the HPA's target (still recorded);
4. the trident client through nginx while one replica is killed (SIGKILL, a crash): only the requests in
   flight on it may fail.

    python -m perf.scaleout [--replicas 2] [--repository DIR] [--json report.json]

Without `--repository` it exports `yolov8` (python flavour) and `whisper` (tiny), synthetic weights, into a
temporary directory; the replicas serve them without their warm-up (scaling is under test, not warm-up).
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
from trident.calls import admin_headers
from trident_serving import server

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
ADAPTER_VALUES = KUBERNETES / "prometheus-adapter" / "values.yaml"
NAMESPACE = "trident"
MODEL = "yolov8"  # the load
# Loaded for its metrics only: the Whisper rules (adapter and KEDA) must find their series.
SERVED = (MODEL, "whisper")
# kube-controller-manager's --horizontal-pod-autoscaler-tolerance (default 0.1): the HPA changes nothing while
# value / target lies within 1 +- this.
HPA_TOLERANCE = 0.1


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
    # 3x: the queues pass the HPA's threshold severalfold (peak 23 against 4 at 5x on 2 cores, where most of the
    # excess only waited in perf_analyzer and nginx); more only adds work for the load generator and the proxy.
    load_requests: int = 64
    overload: float = 3.0
    overload_seconds: float = 5.0
    client_seconds: float = 4.0  # client-side round-robin phase
    kill_seconds: float = 8.0  # proxy phase during which one replica is killed ...
    kill_after: float = 3.0  # ... this long after it starts
    idle_timeout: float = 30.0  # how long to wait for the metric to fall back when idle
    scrape_interval: str = "1s"
    # The adapter rules use 1-minute rates (two Whisper windows); the simulation keeps everything else and
    # evaluates them over a shorter window so that it fits in a test.
    rate_window: str = "5s"


@dataclass
class Report:
    replicas: int
    served: dict[str, list[str]] = field(default_factory=dict)  # pod -> models it serves
    requests_per_replica: dict[str, int] = field(default_factory=dict)  # perf_analyzer through nginx
    offered_rate: float = 0.0  # req/s perf_analyzer offered (open loop)
    offered_requests: int = 0  # requests it sent at that rate
    perf_analyzer_throughput: float = 0.0  # infer/s it measured
    perf_analyzer_hung_runs: int = 0  # runs stopped and repeated because perf_analyzer's own client hung
    client_side_per_replica: dict[str, int] = field(default_factory=dict)  # trident client, round_robin
    client_side_sequential_per_replica: dict[str, int] = field(default_factory=dict)  # one channel, in turn
    http_per_replica: dict[str, int] = field(default_factory=dict)  # trident client over HTTP through nginx
    kill: dict = field(default_factory=dict)  # what happened when a replica died mid-run
    metric: dict = field(default_factory=dict)  # the autoscaling metric: threshold, idle, load, after
    adapter_queries: dict[str, str] = field(default_factory=dict)  # rule name -> PromQL as evaluated
    keda_queries: dict[str, str] = field(default_factory=dict)  # KEDA trigger name -> PromQL as evaluated
    # During the load: the most series each query returned in one evaluation, and its largest value.
    adapter_results: dict[str, dict] = field(default_factory=dict)  # rule name -> {"series": n, "max": v}
    keda_results: dict[str, dict] = field(default_factory=dict)  # trigger name -> {"series": n, "max": v}
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
    cores: set[int] | None = None  # the CPU cores its server and stubs run on (None: any)

    def start(self) -> None:
        if self.cores:  # the calling thread's affinity, which the server and the stubs it starts inherit
            os.sched_setaffinity(0, self.cores)
        server.start(self.options)

    def kill(self) -> None:
        """A crash: SIGKILL to the server and its stubs, no draining; returns once its ports are closed."""
        pid = server.running_pid(self.options)
        if pid:
            os.killpg(pid, signal.SIGKILL)
        wait_for(lambda: not port_open(self.options.grpc_port), 10, f"{self.name} to die")

    def stop(self) -> None:
        server.stop(self.options)

    def load(self, model: str) -> None:
        """Load `model` from the repository (explicit model control); returns once it is READY."""
        import tritonclient.http as httpclient

        with httpclient.InferenceServerClient(f"127.0.0.1:{self.options.http_port}", network_timeout=600) as client:
            client.load_model(model, headers=admin_headers("http"))

    def counter(self, name: str, model: str = MODEL) -> int:
        """Triton's metric `name` of `model` from this replica's own metrics endpoint (0 before the first)."""
        url = f"http://127.0.0.1:{self.options.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        match = re.search(rf'^{name}{{model="{model}"[^}}]*}} (\S+)$', text, re.M)
        return int(float(match.group(1))) if match else 0

    def successes(self, model: str = MODEL) -> int:
        return self.counter("nv_inference_request_success", model)


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
        time.sleep(0.25)
        again = [r.successes() for r in replicas]
        if again == counts:
            break
        counts = again
    return counts


def nginx_log(work: Path, lines: int = 20) -> str:
    """The end of nginx's error log (why a proxied request failed)."""
    path = work / "nginx" / "error.log"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def start_nginx(replicas: list[Replica], work: Path, beside: list[str]) -> tuple[Process, int, int]:
    """nginx balancing gRPC (per request) and HTTP over the replicas, its command prefixed by `beside`
    (`beside_the_pods`); returns (process, grpc_port, http_port)."""
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
    process = Process([*beside, nginx, "-p", str(directory), "-e", str(directory / "error.log"), "-c",
                       str(directory / "nginx.conf"), "-g", "daemon off;"], directory / "stdout.log")
    wait_for(lambda: (process.check_alive("nginx"), port_open(grpc_port))[1], 20, "nginx")
    return process, grpc_port, http_port


def start_prometheus(replicas: list[Replica], work: Path, scrape_interval: str) -> LocalPrometheus:
    """A real Prometheus scraping every replica, labelled as the PodMonitor labels pods."""
    return LocalPrometheus({f"127.0.0.1:{r.options.metrics_port}": {"namespace": NAMESPACE, "pod": r.name}
                            for r in replicas}, work / "prometheus", scrape_interval)


def wait_for_scrape(prometheus: LocalPrometheus, replicas: list[Replica], series: str) -> None:
    """Returns once Prometheus has stored `series` (PromQL) of every replica."""
    wanted = {r.name for r in replicas}
    wait_for(lambda: {p for p, v in prometheus.query(f'up{{namespace="{NAMESPACE}"}}').items() if v == 1} >= wanted
             and set(prometheus.query(series)) >= wanted, 60, f"Prometheus scrape of {series} from every replica",
             interval=0.5)


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

def core_split() -> tuple[set[int] | None, set[int] | None]:
    """(the replicas' cores, the load generator's and proxy's): in a cluster the load comes from beside the pods,
    not from their cores. Here the last core this process may use is perf_analyzer's and nginx's, the others the
    replicas'. Sharing every core, perf_analyzer either starved a Python stub past Triton's 1 s health check ("Stub
    process ... is not healthy", then Triton 2.51 crashed: a CI run at 5x) or, at nice 19, could not send faster
    than the replicas answered, so no queue built up (a CI run: peak 1.7 against the HPA's target of 4).
    (None, None) on a single core."""
    cores = sorted(os.sched_getaffinity(0))
    return (set(cores[:-1]), {cores[-1]}) if len(cores) > 1 else (None, None)


def beside_the_pods(cores: set[int] | None) -> list[str]:
    """The command prefix that runs a program on `cores` (none: anywhere)."""
    return ["taskset", "--cpu-list", ",".join(map(str, sorted(cores)))] if cores else []


def run_perf_analyzer(grpc_port: int, rate: float, requests: int, replicas: list[Replica], timeout: float,
                      beside: list[str], log=print) -> tuple[float, int]:
    """perf_analyzer over gRPC through the proxy: `requests` requests arriving at `rate` per second, whether or
    not earlier ones have finished (open loop, as independent users send them); returns its throughput and how
    many runs hung.

    perf_analyzer sets no deadline on its requests. In one fresh-clone CI run one of its four worker threads got
    none of its 81 answers: three quarters were answered by 05:07:46, then nothing for 5 minutes, no request
    pending at either replica and no failed one at nginx. A run that outlives `timeout` is stopped; if the
    replicas hold none of its requests (the hang is the load tool's own), it is run once more; otherwise, or
    on a second hang, this raises with what each side had. `beside` prefixes its command (`beside_the_pods`)."""
    command = [*beside, str(analyzer.binary()), "-m", MODEL, "-i", "grpc", "-u", f"127.0.0.1:{grpc_port}",
               "--shape", "images:3,640,640",  # yolov8 takes any multiple of 32 (rect letterbox): the largest
               "--request-rate-range", f"{rate:.2f}:{rate:.2f}", "--request-count", str(requests),
               # Asynchronous: in its default synchronous mode each of its 4 threads waits for its answer, which
               # caps the requests outstanding at 4 and turns the open loop into a closed one.
               "--async"]
    hung = 0
    while True:
        before = settled_successes(replicas)
        try:
            result = subprocess.run(command, capture_output=True, text=True, env=analyzer.environment(),
                                    timeout=timeout)
            break
        except subprocess.TimeoutExpired as stopped:
            def pending() -> list[int]:
                return [r.counter("nv_inference_pending_request_count") for r in replicas]
            try:  # what the replicas had received when it was stopped still runs: let it finish
                wait_for(lambda: not any(pending()), 30, "the replicas' pending requests")
            except TimeoutError:
                pass
            answered = sum(settled_successes(replicas)) - sum(before)
            left = pending()
            what = (f"perf_analyzer hung: {answered} of {requests} requests answered in {timeout:.0f} s, "
                    f"pending at the replicas {left}; its output: {(stopped.stdout or b'')[-500:]!r}")
            if any(left) or hung:
                raise RuntimeError(what) from None
            hung += 1
            log(f"{what}; running it once more")
    if result.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed ({result.returncode}):\n{result.stdout[-3000:]}{result.stderr}")
    match = re.search(r"Throughput: ([\d.]+) infer/sec", result.stdout)
    return (float(match.group(1)) if match else 0.0), hung


@dataclass
class Outcome:
    start: float
    end: float
    ok: bool
    error: str = ""


IMAGE = np.random.default_rng(0).random((1, 3, 640, 640), dtype=np.float32)


def client_load(client: Client, concurrency: int, seconds: float, at: float | None = None, action=None,
                requests: int | None = None) -> list[Outcome]:
    """`concurrency` threads sending `yolov8` requests with the trident `client` for `seconds` (or until
    `requests` have been sent); `action()` runs `at` seconds in (e.g. killing a replica). Every request's
    start, end and outcome, on one monotonic clock."""
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
                client.infer(MODEL, {"images": IMAGE}, ["output0"])
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


def hpa_average(result: dict[str, float]) -> float:
    """A per-pod query's result as the HPA compares it with an AverageValue target: the mean over the pods
    reporting it."""
    return sum(result.values()) / len(result) if result else 0.0


def hpa_value(prometheus: LocalPrometheus, query: str) -> float:
    return hpa_average(prometheus.query(query))


class QueryWatcher:
    """Evaluates PromQL `queries` ({name: query}) every `interval` seconds while load runs; `samples[name]` holds
    each evaluation's result ({pod or series: value})."""

    def __init__(self, prometheus: LocalPrometheus, queries: dict[str, str], interval: float = 0.5):
        self.prometheus, self.queries, self.interval = prometheus, queries, interval
        self.samples: dict[str, list[dict[str, float]]] = {name: [] for name in queries}
        self.error: Exception | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, query in self.queries.items():
                try:
                    self.samples[name].append(self.prometheus.query(query))
                except Exception as exc:  # noqa: BLE001 - kept and re-raised by __exit__ in the caller's thread
                    self.error = self.error or exc
            self._stop.wait(self.interval)

    def results(self, names: list[str]) -> dict[str, dict]:
        """{name: {"series": most series one evaluation returned, "max": largest value}} for `names`."""
        return {name: {"series": max((len(r) for r in self.samples[name]), default=0),
                       "max": max((v for r in self.samples[name] for v in r.values()), default=0.0)}
                for name in names}

    def __enter__(self) -> "QueryWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.error is not None and exc[0] is None:
            raise self.error


def export_repository(target: Path) -> Path:
    """`yolov8` (python flavour) and `whisper` (tiny, CPU) from synthetic weights: the cheapest real models."""
    for args in (["yolo", "--flavour", "python"], ["whisper", "--size", "tiny", "--kind", "cpu"]):
        subprocess.run([sys.executable, "-m", "export", *args, "--weights", "synthetic", "--repo", str(target)],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return target


def served_models(source: Path, target: Path, models: tuple[str, ...]) -> Path:
    """A repository of `models` from `source`: their files linked, their configs without `model_warmup`
    (a replica's warm-up is not under test, and whisper's would double its load time on a CPU)."""
    for model in models:
        if not (source / model / "config.pbtxt").is_file():
            raise FileNotFoundError(f"{source} has no {model}: export it (python -m export ...) or omit --repository")
        (target / model).mkdir(parents=True, exist_ok=True)
        for item in (source / model).iterdir():
            if item.name not in ("config.pbtxt", "__pycache__"):
                (target / model / item.name).symlink_to(item.resolve())
        config = re.sub(r"\nmodel_warmup \[.*?\n\]", "", (source / model / "config.pbtxt").read_text(), flags=re.S)
        (target / model / "config.pbtxt").write_text(config)
    return target


# -- the run -------------------------------------------------------------------------------------------------

def run(options: ScaleOutOptions, log=print) -> Report:
    """Run every phase and return the measured figures (raises if a part cannot start)."""
    began = time.monotonic()
    with ExitStack() as stack:
        work = options.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="scaleout-")))
        work.mkdir(parents=True, exist_ok=True)
        source = options.repository or export_repository(work / "export")
        # yolov8 at start; whisper, which only has to publish its metrics, loads during the sequential checks.
        repository = served_models(source, work / "repository", (MODEL,))
        pods, load_cores = core_split()
        beside = beside_the_pods(load_cores)
        replicas = [Replica(f"trident-sim-{i}", server.on_free_ports(
            repository=repository, run_dir=work / f"replica-{i}", ready_timeout=180), cores=pods)
            for i in range(options.replicas)]
        for replica in replicas:
            stack.callback(replica.stop)
        # Start everything together: a replica's start is mostly waiting on its stubs, and nginx and Prometheus
        # need only the replicas' ports (nginx tries an upstream at a request, Prometheus retries its scrapes).
        errors: list[BaseException] = []
        parts: dict[str, object] = {}
        starts = [*(r.start for r in replicas),
                  lambda: parts.update(nginx=start_nginx(replicas, work, beside)),
                  lambda: parts.update(prometheus=start_prometheus(replicas, work, options.scrape_interval))]
        starters = [threading.Thread(target=_collect, args=(errors, start)) for start in starts]
        for thread in starters:
            thread.start()
        for thread in starters:
            thread.join()
        if "nginx" in parts:
            stack.callback(parts["nginx"][0].stop)
        if "prometheus" in parts:
            stack.callback(parts["prometheus"].stop)
        if errors:
            raise errors[0]
        (nginx, grpc_port, http_port), prometheus = parts["nginx"], parts["prometheus"]
        log(f"{len(replicas)} replicas ready: gRPC ports {[r.options.grpc_port for r in replicas]}; nginx gRPC "
            f":{grpc_port} HTTP :{http_port}, Prometheus :{prometheus.port}; cores: replicas {sorted(pods or [])}, "
            f"perf_analyzer and nginx {sorted(load_cores or [])}")
        wait_for_scrape(prometheus, replicas, 'nv_inference_queue_duration_us{model="%s"}' % MODEL)
        served_models(source, repository, SERVED[1:])
        # On the first replica only (the one that survives phase 4): one more torch-importing stub per replica
        # would slow this 2-core machine for no added check.
        loader = threading.Thread(target=_collect, args=(errors, lambda: [replicas[0].load(m) for m in SERVED[1:]]),
                                  daemon=True)
        loader.start()

        report = Report(replicas=len(replicas), served={r.name: [MODEL] for r in replicas})
        rules = adapter_rules()
        pods = [r.name for r in replicas]
        report.adapter_queries = {name: rule.promql(pods, window=options.rate_window)
                                  for name, rule in rules.items()}
        # The KEDA queries select pods by name (trident-...) in namespace trident: the simulated pods match.
        report.keda_queries = {name: query.replace("[1m]", f"[{options.rate_window}]")
                               for name, (query, _) in keda_triggers().items()}
        # Every rule is valid PromQL (a PrometheusError here names the broken one); keyed (kind, name).
        queries = {**{("adapter", n): q for n, q in report.adapter_queries.items()},
                   **{("keda", n): q for n, q in report.keda_queries.items()}}
        for query in queries.values():
            prometheus.query(query)
        metric_name = "trident_queued_requests"
        threshold = hpa_targets()[metric_name]
        query = report.adapter_queries[metric_name]
        idle_before = hpa_value(prometheus, query)

        # 1. client-side balancing: gRPC round_robin over the replicas' own addresses, no proxy. The trident
        #    client keeps one gRPC channel per thread; each channel's round_robin rotates over the replicas it is
        #    connected to, from a random one. So first one channel alone: once connected to every replica (each
        #    has answered it), its sequential requests must alternate exactly.
        target = static_target([f"127.0.0.1:{r.options.grpc_port}" for r in replicas])
        client = Client(target, timeout=60)
        initial = [r.successes() for r in replicas]
        for _ in range(20):
            client.infer(MODEL, {"images": IMAGE}, ["output0"])
            if all(r.successes() > i for r, i in zip(replicas, initial)):
                break
        before = settled_successes(replicas)
        for _ in range(2 * len(replicas)):  # in this thread: its channel is the connected one
            client.infer(MODEL, {"images": IMAGE}, ["output0"])
        after = settled_successes(replicas)
        report.client_side_sequential_per_replica = {r.name: a - b for r, a, b in zip(replicas, after, before)}

        # HTTP through the proxy too: nginx balances each HTTP/1.1 request over its keep-alive upstreams.
        before = after
        outcomes = client_load(Client(f"http://127.0.0.1:{http_port}", timeout=60), 1, 0.0,
                               requests=2 * len(replicas))
        after = settled_successes(replicas)
        report.http_per_replica = {r.name: a - b for r, a, b in zip(replicas, after, before)}
        if not all(o.ok for o in outcomes):
            raise RuntimeError(f"HTTP through nginx failed: {[o.error for o in outcomes if not o.ok][:1]}; "
                               f"nginx error log:\n{nginx_log(work)}")
        log(f"sequential requests: one round_robin channel {report.client_side_sequential_per_replica}, "
            f"HTTP via nginx {report.http_per_replica}")

        # Whisper's load competes for the CPU: it must be over before the replicas' capacity is measured.
        loader.join()
        if errors:
            raise errors[0]
        wait_for_scrape(prometheus, replicas[:1], "trident_whisper_active_transcriptions")
        report.served[replicas[0].name] += SERVED[1:]
        log(f"{', '.join(SERVED[1:])} loaded on {replicas[0].name}")

        #    Then the trident client from `concurrency` threads, a closed loop: it also measures what the replicas
        #    serve together, which sets the offered load of phase 2. (No request was sent since `after`.)
        before = after
        outcomes = client_load(client, options.concurrency, options.client_seconds)
        after = settled_successes(replicas)
        report.client_side_per_replica = {r.name: a - b for r, a, b in zip(replicas, after, before)}
        failed = [o for o in outcomes if not o.ok]
        if failed:
            raise RuntimeError(f"client-side balancing: {len(failed)} failures, e.g. {failed[0].error}")
        capacity = len(outcomes) / (max(o.end for o in outcomes) - min(o.start for o in outcomes))
        log(f"client-side round_robin ({target}), {options.concurrency} threads: {capacity:.1f} req/s, per replica "
            f"{report.client_side_per_replica}")

        # 2. perf_analyzer through the proxy, offering `overload` x that capacity: queues build on every replica, as
        #    when traffic outgrows a Deployment; then it stops and they drain.
        report.offered_rate = round(options.overload * capacity, 2)
        report.offered_requests = max(options.load_requests,
                                      math.ceil(report.offered_rate * options.overload_seconds))
        before = after
        # The watcher goes on until the metric has fallen back: a request's queue time reaches the counters when
        # it finishes, and Prometheus a scrape later, so the rates peak as the backlog's last requests finish.
        with QueryWatcher(prometheus, queries) as watcher:
            # A generous bound: the replicas answer the requests in offered_requests / capacity seconds.
            timeout = max(60.0, 6 * report.offered_requests / capacity)
            report.perf_analyzer_throughput, report.perf_analyzer_hung_runs = run_perf_analyzer(
                grpc_port, report.offered_rate, report.offered_requests, replicas, timeout, beside, log)
            after = settled_successes(replicas)
            # 3. idle: every request has been answered; the metric falls back below the target, beyond the
            #    HPA's tolerance (where a scale-down becomes possible).
            start = time.monotonic()
            idle_after = hpa_value(prometheus, query)
            while idle_after >= threshold * (1 - HPA_TOLERANCE) and time.monotonic() - start < options.idle_timeout:
                time.sleep(0.5)
                idle_after = hpa_value(prometheus, query)
            waited = time.monotonic() - start
        report.requests_per_replica = {r.name: a - b for r, a, b in zip(replicas, after, before)}
        log(f"perf_analyzer via nginx, {report.offered_requests} requests at {report.offered_rate} req/s: "
            f"{report.perf_analyzer_throughput:.1f} infer/s, per replica {report.requests_per_replica}")
        results = watcher.results(list(queries))
        report.adapter_results = {n: r for (kind, n), r in results.items() if kind == "adapter"}
        report.keda_results = {n: r for (kind, n), r in results.items() if kind == "keda"}
        log(f"queries during the load (series, max): adapter {report.adapter_results}, KEDA {report.keda_results}")
        # The HPA compares the mean over the pods reporting the metric with its AverageValue target; KEDA
        # (metricType AverageValue) divides its query's single value by the replica count.
        hpa_samples = [hpa_average(r) for r in watcher.samples[("adapter", metric_name)]]
        keda_samples = [sum(r.values()) / len(replicas) for r in watcher.samples[("keda", "queued-requests")]]
        load_peak = max(hpa_samples, default=0.0)
        above = sum(v > threshold for v in hpa_samples) * watcher.interval
        report.metric = {"name": metric_name, "threshold": threshold, "window": options.rate_window,
                         "idle_before": idle_before, "load_peak": load_peak, "seconds_above_threshold": above,
                         "keda_threshold": keda_triggers()["queued-requests"][1],
                         "keda_load_peak": max(keda_samples, default=0.0),
                         "idle_after": idle_after, "seconds_to_fall_back": round(waited, 1)}
        log(f"{metric_name}: idle {idle_before:.2f}, peak under load {load_peak:.2f} (threshold {threshold}, "
            f"above it for {above:.1f} s), back to {idle_after:.2f} {waited:.1f} s after the load ended")

        # 4. a replica crashes mid-run behind the proxy.
        victim, survivors = replicas[-1], replicas[:-1]
        killed_at: list[float] = []  # when the kill was sent, when the victim's ports were closed
        before = after[:-1]  # the survivors' counts (idle since)

        def kill() -> None:
            killed_at.append(time.monotonic())
            victim.kill()
            killed_at.append(time.monotonic())

        outcomes = client_load(Client(f"127.0.0.1:{grpc_port}", timeout=60), options.concurrency,
                               options.kill_seconds, at=options.kill_after, action=kill)
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
