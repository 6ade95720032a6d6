"""A real Prometheus (Debian's `prometheus` package) on a loopback port, for the monitoring tests and the
scale-out simulation: started on a config of static scrape targets, ready when `/-/ready` says so, queried
through its HTTP API, stopped with its process group."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from trident_serving import server


class PrometheusError(RuntimeError):
    """Prometheus is missing, did not start, or refused a query."""


def binary(tool: str = "prometheus") -> str:
    """The path of `tool` (prometheus or promtool), or a message saying which package installs it."""
    path = shutil.which(tool) or (f"/usr/bin/{tool}" if Path(f"/usr/bin/{tool}").exists() else None)
    if path is None:
        raise PrometheusError(f"{tool} not found: install Debian's `prometheus` package (make system-deps)")
    return path


class LocalPrometheus:
    """Scrapes `targets` ({"host:port": {label: value}}) every `scrape_interval`; data under `folder`."""

    def __init__(self, targets: dict[str, dict[str, str]], folder: Path, scrape_interval: str = "1s",
                 timeout: float = 60.0):
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval,
                       "evaluation_interval": scrape_interval},
            "scrape_configs": [{"job_name": "triton", "static_configs": [
                {"targets": [target], "labels": labels} for target, labels in targets.items()]}],
        }
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = server.free_port()
        self.log = folder / "prometheus.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [binary(), f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h",
                 "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.ready():  # the port opens before the storage does: queries answer 503 until then
            if self.process.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self.process.returncode}:\n"
                                      f"{self.log.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise PrometheusError(f"prometheus not ready after {timeout:.0f} s")
            time.sleep(0.2)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def api(self, path: str, **params) -> dict:
        """GET /api/v1/<path>; a PromQL error comes back as its JSON body ({'status': 'error', ...})."""
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=120) as response:  # generous: CI machines are shared
                return json.load(response)
        except urllib.error.HTTPError as exc:  # 400 bad_data / 422 execution errors carry a JSON body
            return json.load(exc)

    def query(self, expr: str, label: str = "pod") -> dict[str, float]:
        """Evaluate `expr` now: {value of `label` (or "") : value}. Raises PrometheusError on a PromQL error."""
        body = self.api("query", query=expr)
        if body.get("status") != "success":
            raise PrometheusError(f"PromQL failed: {expr}: {body}")
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in body["data"]["result"]}

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
