"""Test harness: export synthetic weights into a temporary repository and serve it with the real Triton server.

The models exported (and so the tests collected) are those named in TRIDENT_TEST_MODELS
(default: all of yolo, whisper, easyocr); tests of other models are deselected, never skipped.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from trident import Client
from trident_serving import server

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
ALL_MODELS = ("yolo", "whisper", "easyocr")
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


@contextlib.contextmanager
def serve(repository: Path, run_dir: Path) -> Iterator[Server]:
    """The real Triton server (pip-bundled 2.51 binary) serving `repository` on free loopback ports, for a block."""
    options = server.on_free_ports(repository=repository, run_dir=run_dir)
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


@pytest.fixture(params=["grpc", "http"])
def client(request, triton) -> Client:
    """A trident client of the test server, over each protocol."""
    return triton.client(request.param)
