"""The local launcher (trident_serving.server) against the real tritonserver, on an empty repository (no model
to load: each start takes seconds)."""
from __future__ import annotations

import contextlib
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest
import tritonclient.grpc

from trident_serving import server

PORTS = ("grpc_port", "http_port", "metrics_port")


class AlwaysReady(BaseHTTPRequestHandler):
    """Answers 200 to every GET: on a taken HTTP port, /v2/health/ready says "ready" for the wrong server."""

    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"not tritonserver")

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def squatter(port: int) -> Iterator[None]:
    """Another process's HTTP server on 127.0.0.1:`port` for a block."""
    squatting = ThreadingHTTPServer(("127.0.0.1", port), AlwaysReady)
    thread = threading.Thread(target=squatting.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        squatting.shutdown()
        squatting.server_close()


def test_free_ports_are_different():
    assert len(set(server.free_ports(64))) == 64


@pytest.mark.parametrize("port", PORTS)
def test_start_moves_off_a_port_taken_before_tritonserver_binds_it(tmp_path, port):
    """Another process binds one of the free ports picked for the server before tritonserver does (two test
    servers or replicas starting together): the start succeeds on new ports, and the options say which."""
    (tmp_path / "repository").mkdir()
    options = server.on_free_ports(repository=tmp_path / "repository", run_dir=tmp_path / "run")
    taken = getattr(options, port)
    with squatter(taken):
        pid = server.start(options)
        try:
            assert getattr(options, port) != taken
            ports = {options.http_port, options.grpc_port, options.metrics_port}
            assert len(ports) == 3 and ports <= server.listening_ports(pid)
            assert server.is_ready(options)
            assert tritonclient.grpc.InferenceServerClient(f"127.0.0.1:{options.grpc_port}").is_server_ready()
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{options.metrics_port}/metrics", timeout=10).read()
            assert b"nv_cpu_utilization" in metrics
            log = options.log_file.read_text(errors="replace")  # both starts, in order
            assert log.index(f"Socket '0.0.0.0:{taken}' already in use") < log.index(
                f"Started HTTPService at 0.0.0.0:{options.http_port}")
        finally:
            server.stop(options)


def test_fixed_ports_are_not_changed(tmp_path):
    """Ports the caller chose (make serve's 8000-8002) are not swapped: the start fails, naming the port."""
    (tmp_path / "repository").mkdir()
    http, grpc, metrics = server.free_ports(3)
    options = server.ServerOptions(repository=tmp_path / "repository", run_dir=tmp_path / "run", http_port=http,
                                   grpc_port=grpc, metrics_port=metrics)
    try:
        with squatter(http), pytest.raises(SystemExit, match=f"the HTTP port {http}: another process uses it .*"
                                                               "--http-port"):
            server.start(options)
        assert server.running_pid(options) is None  # start() stopped what it started
    finally:
        server.stop(options)  # in case it started after all
    assert (options.http_port, options.grpc_port, options.metrics_port) == (http, grpc, metrics)
