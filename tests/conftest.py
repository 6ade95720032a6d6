"""Test harness: export synthetic weights into a temporary repository and serve it with the real Triton server.

The models exported (and so the tests collected) are those named in TRIDENT_TEST_MODELS
(default: all of yolo, whisper, easyocr); tests of other models are deselected, never skipped.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import pytest
import tritonclient.grpc

from trident import Client
from trident_serving import server

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
ALL_MODELS = ("yolo", "whisper", "easyocr")
T = TypeVar("T")
# Synthetic weights: real architectures, random (seeded) values; whisper at `tiny` size for CPU speed.
EXPORT_ARGS = {
    "yolo": ["yolo", "--weights", "synthetic", "--flavour", "python"],
    # CPU instance: the parity references run whisper.transcribe on the CPU in fp32, as this instance does.
    "whisper": ["whisper", "--size", "tiny", "--weights", "synthetic", "--kind", "cpu"],
    "easyocr": ["easyocr", "--weights", "synthetic"],
}


def selected_models() -> list[str]:
    names = os.environ.get("TRIDENT_TEST_MODELS", " ".join(ALL_MODELS)).replace(",", " ").split()
    unknown = set(names) - set(ALL_MODELS)
    if unknown:
        raise pytest.UsageError(f"TRIDENT_TEST_MODELS names unknown models: {sorted(unknown)}")
    return names


def pytest_configure(config):
    for name in ALL_MODELS:
        config.addinivalue_line("markers", f"{name}: needs the {name} export")


def pytest_collection_modifyitems(config, items):
    wanted = set(selected_models())
    keep, drop = [], []
    for item in items:
        models = {m.name for m in item.iter_markers() if m.name in ALL_MODELS}
        (keep if models <= wanted else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def repository(tmp_path_factory) -> Path:
    """A model repository with the selected models exported from synthetic weights."""
    repo = tmp_path_factory.mktemp("model_repository")
    for name in selected_models():
        subprocess.run([sys.executable, "-m", "export", *EXPORT_ARGS[name], "--repo", str(repo)],
                       cwd=ROOT, check=True)
    return repo


@pytest.fixture(scope="session")
def ct2_repository(tmp_path_factory) -> Path:
    """A repository holding the synthetic whisper of `repository` converted by the export for the ctranslate2
    engine (float32, CPU instance): converted once for the tests that serve that engine."""
    repo = tmp_path_factory.mktemp("ct2_repository")
    subprocess.run([sys.executable, "-m", "export", *EXPORT_ARGS["whisper"], "--engine", "ctranslate2",
                    "--compute-type", "float32", "--repo", str(repo)], cwd=ROOT, check=True)
    return repo


@dataclass
class Server:
    options: server.ServerOptions
    repository: Path

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.options.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.options.grpc_port}"

    def client(self, protocol: str) -> Client:
        return Client(self.http_url if protocol == "http" else self.grpc_url, protocol=protocol)

    def is_ready(self) -> bool:
        return server.is_ready(self.options)

    def metrics(self) -> dict[tuple[str, str], float]:
        """Prometheus counters as {(metric, model): value} for the per-model inference metrics."""
        url = f"http://127.0.0.1:{self.options.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        found = {}
        for name, model, value in re.findall(r'^(nv_inference_\w+)\{model="([^"]+)"[^}]*\} (\S+)$', text, re.M):
            found[(name, model)] = found.get((name, model), 0.0) + float(value)
        return found

    def metrics_after(self, expected: dict[tuple[str, str], float], before: dict, timeout: float = 30.0) -> dict:
        """metrics() once each counter of `expected` has risen by at least its value since `before`: Triton
        records a request's statistics after its response is sent, so a client can be answered first."""
        deadline = time.monotonic() + timeout
        while True:
            now = self.metrics()
            if all(now.get(key, 0.0) - before.get(key, 0.0) >= value for key, value in expected.items()):
                return now
            if time.monotonic() > deadline:
                raise AssertionError(f"counters did not reach {expected} over {before} in {timeout:.0f} s: {now}")
            time.sleep(0.1)

    def load_config(self, model: str, config: dict) -> dict:
        """Load `model` with `config` (Triton's load with a config override; the files stay as they are) and
        return once the new copy is READY and the old copy's stubs have exited (tests that count stubs would take
        a lingering one for a death); returns the config now served."""
        import tritonclient.http as httpclient

        from trident_serving import supervisor

        admin = httpclient.InferenceServerClient(self.http_url, network_timeout=600)
        admin.load_model(model, config=json.dumps(config))
        ready, why = supervisor.check(self.http_url)
        assert ready, f"the server is not ready after loading {model} with a config override: {why}"
        instances = sum(int(group.get("count", 1)) for group in config["instance_group"])
        triton = supervisor.triton_pid(int(self.options.pid_file.read_text()))
        deadline = time.monotonic() + 60
        while sum(stub.model == model for stub in supervisor.find_stubs(triton).values()) > instances:
            assert time.monotonic() < deadline, f"the replaced {model} stubs did not exit within 60 s"
            time.sleep(0.2)
        return admin.get_model_config(model)

    def batch_executions(self, model: str) -> tuple[int, dict[int, int]]:
        """Triton's statistics of `model`: its inference count, and its executions by batch size."""
        stats = tritonclient.grpc.InferenceServerClient(self.grpc_url).get_inference_statistics(model)
        counts = {}
        for entry in stats.model_stats:
            for batch in entry.batch_stats:
                counts[batch.batch_size] = counts.get(batch.batch_size, 0) + batch.compute_infer.count
        return sum(entry.inference_count for entry in stats.model_stats), counts

    def executions_since(self, model: str, before: tuple[int, dict[int, int]], inferences: int,
                         timeout: float = 30.0) -> dict[int, int]:
        """`model`'s executions by batch size since `before` (a `batch_executions()`), once Triton's statistics
        count `inferences` more inferences: they are recorded after the responses are sent."""
        deadline = time.monotonic() + timeout
        while (now := self.batch_executions(model))[0] - before[0] < inferences:
            assert time.monotonic() < deadline, f"Triton's statistics never counted {inferences} {model} inferences"
            time.sleep(0.1)
        since = {size: n - before[1].get(size, 0) for size, n in now[1].items()}
        return {size: n for size, n in since.items() if n}

    def instances(self, model: str) -> int:
        """How many instances of `model` the server runs (its loaded config)."""
        config = tritonclient.grpc.InferenceServerClient(self.grpc_url).get_model_config(model, as_json=True)
        return sum(int(group.get("count", 1)) for group in config["config"]["instance_group"])

    def batched(self, model: str, burst: Callable[[], T]) -> T:
        """Run `burst` (concurrent requests to `model`, all with the same inputs) and fail unless its queue proved
        that an execution of `model` took several of them together; returns what `burst` returned.

        Triton's dynamic batcher promises no batch. A queue does: a request counts as pending
        (nv_inference_pending_request_count) until its execution starts, so the pending ones sit in the queue
        or in a batch being handed to an instance, at most one such batch per instance. With instances + 2
        pending at once, two sit together, and run together: an instance that frees takes all the queued
        requests it can batch, up to max_batch_size (core's dynamic_batch_scheduler.cc).
        """
        needed = self.instances(model) + 2
        most = 0.0
        with ThreadPoolExecutor(1) as pool:
            job = pool.submit(burst)
            while not job.done() and most < needed:
                most = max(most, self.metrics().get(("nv_inference_pending_request_count", model), 0.0))
                time.sleep(0.05)  # a queue lasts as long as the executions it waits for
            result = job.result()
        assert most >= needed, f"at most {most:.0f} {model} requests waited at once: {needed} prove batching"
        return result


@contextlib.contextmanager
def detect_changed(triton: "Server", change: Callable[[dict], dict]) -> Iterator[None]:
    """The server's `detect` loaded (Triton's load with a config override) with `change(exported config)`, for a
    block; the exported config is loaded back afterwards (a plain load would keep the override). Both loads leave
    out the warm-up, as the exported config has none."""
    import tritonclient.http as httpclient

    exported = httpclient.InferenceServerClient(triton.http_url).get_model_config("detect")
    triton.load_config("detect", change(exported))
    try:
        yield
    finally:
        assert triton.load_config("detect", exported) == exported


def gathering(config: dict, batch: int, seconds: float) -> dict:
    """`config` with one instance whose dynamic batcher waits up to `seconds` for `batch` requests
    (preferred_batch_size): requests sent within that time run as one execution, whatever the machine's speed.
    (Triton's batcher promises no batch otherwise: a test that needs one gathers it.)"""
    return {**config, "instance_group": [{**config["instance_group"][0], "count": 1}],
            "dynamic_batching": {**config["dynamic_batching"], "preferred_batch_size": [batch],
                                 "max_queue_delay_microseconds": int(seconds * 1e6)}}


def detect_gathering(triton: "Server", batch: int, seconds: float) -> contextlib.AbstractContextManager:
    """`detect` gathering `batch` requests into one execution (see `gathering`), for a block."""
    return detect_changed(triton, lambda exported: gathering(exported, batch, seconds))


@contextlib.contextmanager
def serve(repository: Path, run_dir: Path) -> Iterator[Server]:
    """The real Triton server (pip-bundled 2.51 binary) serving `repository` on free loopback ports, for a block."""
    # Loading every model takes ~2 min on an idle 2-core machine; leave room for a busy one.
    options = server.on_free_ports(repository=repository, run_dir=run_dir, ready_timeout=600)
    server.start(options)
    try:
        yield Server(options, repository)
    finally:
        server.stop(options)


@pytest.fixture(scope="session")
def triton(repository, tmp_path_factory) -> Server:
    """The session's server, serving the synthetic repository."""
    with serve(repository, tmp_path_factory.mktemp("run")) as started:
        yield started


@pytest.fixture(scope="session")
def real_triton(tmp_path_factory) -> Server:
    """A second server with REAL weights where they install offline from the package index: Whisper base (converted
    from CTranslate2, on a CPU instance) and EasyOCR English; YOLO stays synthetic (no weights on the index).
    Shared by the real-weights tests of whisper and of the media pipeline: one start instead of one each."""
    import easyocr_en_models

    repo = tmp_path_factory.mktemp("real_repository")
    for args in (["whisper", "--weights", "base-offline", "--kind", "cpu"],
                 ["easyocr", "--lang", "en", "--weights", str(easyocr_en_models.model_dir())],
                 EXPORT_ARGS["yolo"]):
        subprocess.run([sys.executable, "-m", "export", *args, "--repo", str(repo)], cwd=ROOT, check=True)
    with serve(repo, tmp_path_factory.mktemp("real_run")) as started:
        yield started


@pytest.fixture(scope="session")
def real_triton_ct2(tmp_path_factory) -> Server:
    """A server of the same real Whisper base served by the ctranslate2 engine (the model folder as it is, float32:
    faster-whisper's arithmetic on the CPU), for the real-weights whisper tests of both engines."""
    repo = tmp_path_factory.mktemp("real_ct2_repository")
    subprocess.run([sys.executable, "-m", "export", "whisper", "--weights", "base-offline", "--kind", "cpu",
                    "--engine", "ctranslate2", "--compute-type", "float32", "--repo", str(repo)], cwd=ROOT, check=True)
    with serve(repo, tmp_path_factory.mktemp("real_ct2_run")) as started:
        yield started


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory) -> Path:
    """The generated test media (tests/data/make_media.py): a 20 s 720p video with speech, photos, on-screen text
    and a scene cut, and the files derived from it."""
    from tests.data import make_media

    directory = tmp_path_factory.mktemp("media")
    make_media.build(directory)
    return directory


@pytest.fixture(params=["grpc", "http"])
def client(request, triton) -> Client:
    """A trident client of the test server, over each protocol."""
    return triton.client(request.param)
