"""Triton behind the gateway (issue 19, part 2), on the real bundled server: the model-repository API restricted to
a header key (`--restrict-model-repository`), gRPC over TLS and mutual TLS with certificates made here by openssl.

One server per mode, module-scoped: echo models (tests/test_supervisor_liveness.py) where the mode is the subject,
`detect` + `yolov8` only where a real model call over mutual TLS is.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import trident.aio
from perf.scaleout import served_models
from trident import Client, DetectResult, ServerUnavailableError, TridentError, calls, cli
from trident_gateway import Settings
from trident_serving import server, supervisor
from tests.test_gateway import Running
from test_supervisor_liveness import echo_repository

DATA = Path(__file__).resolve().parent / "data"
KEY = secrets.token_hex(16)
ECHO = "echo"


@contextlib.contextmanager
def serving(run_dir: Path, **options) -> Iterator[server.ServerOptions]:
    """The real server (supervised, as the launcher starts it) with `options`, on free loopback ports."""
    started = server.on_free_ports(run_dir=run_dir, ready_timeout=300, **options)
    server.start(started)
    try:
        yield started
    finally:
        server.stop(started)


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f} s"
        time.sleep(0.2)


def echo(client, module, headers: dict | None = None) -> float:
    """One inference of the echo model through tritonclient `module` (grpc or http)."""
    tensor = module.InferInput("IN", [1], "FP32")
    tensor.set_data_from_numpy(np.array([4.5], dtype=np.float32))
    return float(client.infer(ECHO, [tensor], headers=headers).as_numpy("OUT")[0])


# -- the restricted model-repository API ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def restricted(tmp_path_factory) -> Iterator[server.ServerOptions]:
    repository = echo_repository(tmp_path_factory.mktemp("echo_models"), [ECHO])
    with serving(tmp_path_factory.mktemp("restricted_run"), repository=repository, admin_key=KEY) as options:
        yield options


def test_the_client_names_the_servers_header():
    assert calls.ADMIN_HEADER == server.ADMIN_HEADER and calls.ADMIN_KEY_ENV == server.ADMIN_KEY_ENV
    assert server.restricted_api_flags("") == []
    with pytest.raises(ValueError):
        server.restricted_api_flags("a:b=c")  # Triton's flag syntax cannot carry it


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_load_and_unload_need_the_key(restricted, protocol):
    module = httpclient if protocol == "http" else grpcclient
    port = restricted.http_port if protocol == "http" else restricted.grpc_port
    client = module.InferenceServerClient(f"127.0.0.1:{port}")
    admin = calls.admin_headers(protocol, KEY)
    wrong = calls.admin_headers(protocol, "not-the-key")
    refusals = (lambda h: client.unload_model(ECHO, headers=h), lambda h: client.get_model_repository_index(headers=h))
    for headers in (None, wrong):
        for call in refusals:
            with pytest.raises(InferenceServerException, match="restricted"):
                call(headers)
    assert client.is_model_ready(ECHO), "a refused unload unloaded the model"
    client.unload_model(ECHO, headers=admin)
    wait_until(lambda: not client.is_model_ready(ECHO), 60, "the model did not unload")
    for headers in (None, wrong):
        with pytest.raises(InferenceServerException, match="restricted"):
            client.load_model(ECHO, headers=headers)
    assert not client.is_model_ready(ECHO), "a refused load loaded the model"
    client.load_model(ECHO, headers=admin)
    assert client.is_model_ready(ECHO)
    assert echo(client, module) == 4.5  # inference stays open


def test_readiness_names_a_model_that_is_not_ready(restricted):
    """The gateway's /readyz is 503 naming the model while one is unloaded, 200 again once it is back."""
    admin = grpcclient.InferenceServerClient(f"127.0.0.1:{restricted.grpc_port}")
    headers = calls.admin_headers("grpc", KEY)
    settings = Settings(triton=f"127.0.0.1:{restricted.grpc_port}", auth=False, triton_admin_key=KEY)

    def state() -> str:
        index = admin.get_model_repository_index(headers=headers, as_json=True)["models"]
        return next(model.get("state", "") for model in index if model["name"] == ECHO)

    with Running(settings) as gateway:
        assert httpx.get(f"{gateway.url}/readyz", timeout=30).json() == {"status": "ready", "models": {ECHO: "READY"}}
        admin.unload_model(ECHO, headers=headers)
        try:
            wait_until(lambda: state() == "UNAVAILABLE", 60, "the model did not unload")  # past UNLOADING
            ready = httpx.get(f"{gateway.url}/readyz", timeout=30)
        finally:
            admin.load_model(ECHO, headers=headers)
        assert ready.status_code == 503 and int(ready.headers["Retry-After"]) > 0, ready.text
        assert ready.json()["error"] == {"code": "not_ready", "message": f"{ECHO} is UNAVAILABLE"}
        assert ready.json()["server_ready"] is True and ready.json()["models"] == {ECHO: "UNAVAILABLE"}
        assert httpx.get(f"{gateway.url}/readyz", timeout=30).status_code == 200


def test_health_checks_send_the_key(restricted, monkeypatch, capsys):
    http = f"127.0.0.1:{restricted.http_port}"
    grpc = f"127.0.0.1:{restricted.grpc_port}"
    monkeypatch.delenv(server.ADMIN_KEY_ENV, raising=False)
    ok, why = supervisor.check(http)
    assert not ok and "403" in why
    with pytest.raises(TridentError, match="restricted"):
        Client(grpc).health()
    assert Client(grpc, admin_key=KEY).health()["models"] == {ECHO: "READY"}
    monkeypatch.setenv(server.ADMIN_KEY_ENV, KEY)  # what the container's health check and `trident health` read
    assert supervisor.check(http) == (True, f"ready: {ECHO}")
    for protocol, url in (("grpc", grpc), ("http", http)):
        assert cli.main(["--url", url, "--protocol", protocol, "health"]) == 0
        assert json.loads(capsys.readouterr().out)["models"] == {ECHO: "READY"}


def test_supervisor_recovers_a_killed_stub_with_the_restriction_on(restricted):
    log = restricted.log_file
    triton = supervisor.triton_pid(int(restricted.pid_file.read_text()))
    stub = next(s for s in supervisor.find_stubs(triton).values() if s.model == ECHO)
    # its stub watched: a stub killed before the supervisor's first look at it would never be missed
    wait_until(lambda: f"watching model '{ECHO}': stub processes [{stub.pid}]" in log.read_text(errors="replace"),
               30, "the supervisor did not watch the echo stub")
    os.kill(stub.pid, signal.SIGKILL)
    wait_until(lambda: f"model '{ECHO}' reloaded" in log.read_text(errors="replace"), 90,
               "the supervisor did not reload the model")
    text = log.read_text(errors="replace")
    assert f"stub process [{stub.pid}] of model '{ECHO}' died: reloading the model" in text
    assert "reloading model" not in text, "a reload failed (refused?)"
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{restricted.grpc_port}")
    assert echo(client, grpcclient) == 4.5
    assert supervisor.check(f"127.0.0.1:{restricted.http_port}", headers=supervisor.admin_headers(KEY))[0]


# -- gRPC over TLS ----------------------------------------------------------------------------------------------

def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def signed(folder: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    """A key and a certificate for `name` signed by `ca` (its certificate and key), with `extensions`."""
    key, request, cert, ext = (folder / f"{name}.{suffix}" for suffix in ("key", "csr", "pem", "ext"))
    ext.write_text(extensions + "\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key),
            "-out", str(request), "-subj", f"/CN={name}")
    openssl("x509", "-req", "-in", str(request), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
            "-days", "1", "-out", str(cert), "-extfile", str(ext))
    return key, cert


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and localhost, a client certificate, and a stranger CA."""
    folder = tmp_path_factory.mktemp("certs")
    found = {}
    for ca in ("ca", "other_ca"):
        found[ca], found[f"{ca}_key"] = folder / f"{ca}.pem", folder / f"{ca}.key"
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                "-keyout", str(found[f"{ca}_key"]), "-out", str(found[ca]), "-subj", f"/CN=Trident test {ca}")
    authority = (found["ca"], found["ca_key"])
    found["server_key"], found["server"] = signed(
        folder, "server", authority, "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth")
    found["client_key"], found["client"] = signed(folder, "client", authority, "extendedKeyUsage=clientAuth")
    return found


@pytest.fixture(scope="module")
def tls(tmp_path_factory, certs) -> Iterator[str]:
    """A server whose gRPC port speaks TLS only (echo model); yields its gRPC address."""
    repository = echo_repository(tmp_path_factory.mktemp("tls_models"), [ECHO])
    encryption = server.GrpcTls(certs["server"], certs["server_key"])
    with serving(tmp_path_factory.mktemp("tls_run"), repository=repository, grpc_tls=encryption) as options:
        yield f"127.0.0.1:{options.grpc_port}"


def test_tls_grpc_serves_tritonclient_and_the_trident_client(tls, certs, capsys):
    client = grpcclient.InferenceServerClient(tls, ssl=True, root_certificates=str(certs["ca"]))
    assert echo(client, grpcclient) == 4.5
    trusting = Client(tls, ssl=True, root_certificates=str(certs["ca"]))
    assert trusting.health()["models"] == {ECHO: "READY"}
    assert cli.main(["--url", tls, "--root-cert", str(certs["ca"]), "health"]) == 0
    assert json.loads(capsys.readouterr().out)["ready"] is True


def test_the_tls_port_refuses_plain_text_and_untrusted_servers_are_refused(tls, certs):
    with pytest.raises(InferenceServerException):
        grpcclient.InferenceServerClient(tls).is_server_live(client_timeout=10)
    with pytest.raises(ServerUnavailableError):
        Client(tls, timeout=10).health()
    # a client that trusts another CA does not take the server's certificate
    with pytest.raises(ServerUnavailableError):
        Client(tls, timeout=10, ssl=True, root_certificates=str(certs["other_ca"])).health()


@pytest.fixture(scope="module")
def mutual(repository, tmp_path_factory, certs) -> Iterator[server.ServerOptions]:
    """A server asking every gRPC client for a certificate signed by the CA; `detect` and `yolov8` loaded."""
    # only these two in the repository: the gateway's /readyz asks every model
    models = served_models(repository, tmp_path_factory.mktemp("mutual_models"), ("detect", "yolov8"))
    encryption = server.GrpcTls(certs["server"], certs["server_key"], certs["ca"], mutual=True)
    with serving(tmp_path_factory.mktemp("mutual_run"), repository=models, grpc_tls=encryption,
                 load_models=("yolov8", "detect")) as options:
        yield options


def client_certificate(certs: dict[str, Path]) -> dict[str, str]:
    return {"ssl": True, "root_certificates": str(certs["ca"]), "private_key": str(certs["client_key"]),
            "certificate_chain": str(certs["client"])}


@pytest.mark.yolo
def test_mutual_tls_needs_a_client_certificate(mutual, certs):
    url = f"127.0.0.1:{mutual.grpc_port}"
    image = DATA / "ocr_en_sign.jpg"
    anonymous = grpcclient.InferenceServerClient(url, ssl=True, root_certificates=str(certs["ca"]))
    with pytest.raises(InferenceServerException):
        anonymous.is_server_ready(client_timeout=10)
    with pytest.raises(ServerUnavailableError):
        Client(url, timeout=10, ssl=True, root_certificates=str(certs["ca"])).detect(image)
    known = client_certificate(certs)
    authenticated = grpcclient.InferenceServerClient(url, **known)
    assert authenticated.is_model_ready("detect")
    result = Client(url, **known).detect(image)
    assert isinstance(result, DetectResult)

    async def through_aio() -> DetectResult:  # the gateway's client
        async with trident.aio.Client(url, **known) as client:
            return await client.detect(image)

    assert asyncio.run(through_aio()) == result


@pytest.mark.yolo
def test_analyze_connects_over_mutual_tls(mutual, certs, tmp_path, capsys):
    """`trident analyze` takes the TLS options: without a client certificate the server is unreachable; with it,
    the server answers and is refused for analysis only because this one serves detect alone."""
    url = ["--url", f"127.0.0.1:{mutual.grpc_port}", "--root-cert", str(certs["ca"])]
    command = ["analyze", str(DATA / "ocr_en_sign.jpg"), "--out", str(tmp_path / "out"), "--quiet"]
    assert cli.main([*url, *command]) == 1
    assert "unavailable" in capsys.readouterr().err.lower()
    assert cli.main([*url, "--client-cert", str(certs["client"]), "--client-key", str(certs["client_key"]),
                     *command]) == 1
    assert "not ready for analysis: whisper (not in the repository)" in capsys.readouterr().err


@pytest.mark.yolo
def test_gateway_serves_https_over_mutual_tls_to_triton(mutual, certs, tmp_path):
    port = server.free_port()
    command = [sys.executable, "-m", "trident_gateway", "serve", "--no-auth", "--port", str(port),
               "--triton", f"127.0.0.1:{mutual.grpc_port}", "--ssl-certfile", str(certs["server"]),
               "--ssl-keyfile", str(certs["server_key"]), "--triton-root-cert", str(certs["ca"]),
               "--triton-client-cert", str(certs["client"]), "--triton-client-key", str(certs["client_key"])]
    log = tmp_path / "gateway.log"
    with open(log, "wb") as out:
        gateway = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    context = ssl.create_default_context(cafile=str(certs["ca"]))
    try:
        def ready() -> bool:
            assert gateway.poll() is None, log.read_text(errors="replace")
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{port}/readyz", context=context, timeout=5) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_until(ready, 60, "the gateway did not answer /readyz over HTTPS")
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/readyz", context=context, timeout=5) as response:
            assert json.loads(response.read())["models"] == {"detect": "READY", "yolov8": "READY"}
        with pytest.raises(OSError):  # plain HTTP to the HTTPS port
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(30)
