"""The REST gateway (gateway/, `trident_gateway`) run for real by uvicorn on a free port, in front of the session's
real Triton server, and called over real sockets (httpx, or a raw socket where the test must control the bytes)."""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from tests.conftest import DATA, selected_models
from trident_gateway import Settings, create_app, keys
from trident_serving.server import free_port

IMAGE = DATA / "ocr_en_sign.jpg"
SPEECH = DATA / "speech_en.wav"
IMAGE_LIMIT = 2 * 1024 * 1024  # small, so the over-limit uploads below stay cheap
ENDPOINT_OF = {"yolo": "/v1/detect", "whisper": "/v1/transcribe", "easyocr": "/v1/ocr"}


class Running:
    """A gateway app served by uvicorn in a thread, on a free loopback port."""

    def __init__(self, settings: Settings):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port, log_level="warning",
                                access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)

    def __enter__(self) -> "Running":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def api_client(url: str, key: str | None = None, timeout: float = 120) -> httpx.Client:
    """An HTTP client of the gateway at `url`, sending `key` as its bearer token if given."""
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=timeout)


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gateway") / "keys.json"


@pytest.fixture(scope="module")
def api_key(keys_file) -> str:
    return keys.create(keys_file, "tester")


@pytest.fixture(scope="module")
def gateway(triton, keys_file, api_key):
    with Running(Settings(triton=triton.grpc_url, keys_file=keys_file, max_image_bytes=IMAGE_LIMIT)) as running:
        yield running


@pytest.fixture(scope="module")
def http(gateway, api_key):
    with api_client(gateway.url, api_key) as client:
        yield client


@pytest.fixture(scope="module")
def down():
    """A gateway without keys and with CORS on, pointed at a port where no Triton listens."""
    with Running(Settings(triton=f"127.0.0.1:{free_port()}", auth=False,
                          cors_origins=["https://app.example"])) as running:
        yield running


def as_json(value):
    """A result dict as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def multipart(http: httpx.Client, path: str, file: Path, **fields) -> httpx.Response:
    return http.post(path, files={"file": (file.name, file.read_bytes())}, data={k: str(v) for k, v in fields.items()})


def raw(http: httpx.Client, path: str, data: bytes, content_type: str = "application/octet-stream",
        **params) -> httpx.Response:
    return http.post(path, content=data, params=params, headers={"Content-Type": content_type})


# -- results equal the trident client's --------------------------------------------------------------------------

@pytest.mark.yolo
def test_detect_equals_client(triton, http):
    expected = as_json(triton.client("grpc").detect(str(IMAGE), conf=0.05, iou=0.5).to_dict())
    by_form = multipart(http, "/v1/detect", IMAGE, conf=0.05, iou=0.5)
    by_body = raw(http, "/v1/detect", IMAGE.read_bytes(), "image/jpeg", conf=0.05, iou=0.5)
    assert by_form.status_code == by_body.status_code == 200, (by_form.text, by_body.text)
    assert by_form.json() == by_body.json() == expected
    default = raw(http, "/v1/detect", IMAGE.read_bytes())
    assert default.json() == as_json(triton.client("grpc").detect(str(IMAGE)).to_dict())


@pytest.mark.whisper
def test_transcribe_equals_client(triton, http):
    expected = as_json(triton.client("grpc").transcribe(str(SPEECH), language="en", temperature=0).to_dict())
    by_form = multipart(http, "/v1/transcribe", SPEECH, language="en", temperature=0)
    by_body = raw(http, "/v1/transcribe", SPEECH.read_bytes(), "audio/wav", language="en", temperature=0)
    assert by_form.status_code == by_body.status_code == 200, (by_form.text, by_body.text)
    assert by_form.json() == by_body.json() == expected
    assert expected["language"] == "en"


@pytest.mark.easyocr
def test_ocr_equals_client(triton, http):
    expected = as_json([line.to_dict() for line in triton.client("grpc").read_text(str(IMAGE))])
    by_form = multipart(http, "/v1/ocr", IMAGE)
    by_body = raw(http, "/v1/ocr", IMAGE.read_bytes(), "image/jpeg")
    assert by_form.status_code == by_body.status_code == 200, (by_form.text, by_body.text)
    assert by_form.json() == by_body.json() == expected


# -- refusals ----------------------------------------------------------------------------------------------------

def test_keys_required(gateway, keys_file, api_key):
    body = IMAGE.read_bytes()
    missing = httpx.post(f"{gateway.url}/v1/detect", content=body)
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
    assert missing.json()["error"]["code"] == "unauthorized"
    wrong = httpx.post(f"{gateway.url}/v1/detect", content=body, headers={"Authorization": "Bearer tgw_nope"})
    assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "forbidden"

    # a key revoked through the CLI is refused by the running gateway, without a restart
    doomed = keys.create(keys_file, "doomed")
    empty = httpx.post(f"{gateway.url}/v1/detect", content=b"", headers={"Authorization": f"Bearer {doomed}"})
    assert empty.status_code == 400  # accepted by the key check, refused for its empty body
    cli = [sys.executable, "-m", "trident_gateway", "keys"]
    subprocess.run([*cli, "revoke", "doomed", "--keys", str(keys_file)], check=True, capture_output=True)
    revoked = httpx.post(f"{gateway.url}/v1/detect", content=body, headers={"Authorization": f"Bearer {doomed}"})
    assert revoked.status_code == 403
    listed = subprocess.run([*cli, "list", "--keys", str(keys_file)], check=True, capture_output=True, text=True)
    assert re.search(r"^doomed\tcreated \S+\trevoked ", listed.stdout, re.M)
    assert re.search(r"^tester\tcreated \S+\tactive$", listed.stdout, re.M)
    stored = keys_file.read_text()
    for key in (api_key, doomed):  # neither the file nor the listing holds a key; the listing holds no hash
        assert key not in stored and key not in listed.stdout and keys.digest(key) not in listed.stdout
        assert keys.digest(key) in stored


def test_refuses_to_start_without_keys(tmp_path):
    with pytest.raises(ValueError, match="--no-auth"):
        create_app(Settings(triton="127.0.0.1:1"))
    with pytest.raises(ValueError, match="does not exist"):
        create_app(Settings(triton="127.0.0.1:1", keys_file=tmp_path / "none.json"))
    serve = subprocess.run([sys.executable, "-m", "trident_gateway", "serve", "--port", str(free_port())],
                           capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert serve.returncode == 2 and "--no-auth" in serve.stderr


def test_cli_serve(triton):
    """`python -m trident_gateway serve` as deployed: its own process, the access log on stdout."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "trident_gateway", "serve", "--triton", triton.grpc_url,
                                "--port", str(port), "--no-auth", "--log-level", "warning"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=30)
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, "the gateway did not start"
                time.sleep(0.2)
    finally:
        process.terminate()
        out, err = process.communicate(timeout=30)
    assert ready.status_code == 200, ready.text
    assert process.returncode in (0, -signal.SIGTERM), err  # uvicorn re-raises the signal it shut down on
    assert "--no-auth" in err  # the open API is said out loud
    logged = [json.loads(line) for line in out.splitlines()]
    assert logged[-1]["path"] == "/readyz" and logged[-1]["status"] == 200 and logged[-1]["key"] is None


def _exchange(port: int, head: str, chunks=(), timeout: float = 30.0) -> tuple[str, int]:
    """Send `head` then `chunks` on a raw socket until the gateway answers; its status line, and the bytes of
    `chunks` sent before the answer came. Every chunk goes whole (a partial one would leave a body the gateway
    waits on for ever); waiting more than `timeout` s on the gateway fails the test instead of hanging it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode())
        sent, answered = 0, False
        for chunk in chunks:
            pending = memoryview(chunk)
            while pending and not answered:
                readable, writable, _ = select.select([sock], [sock], [], timeout)
                if readable:  # the gateway answered (or closed) before the whole body was sent
                    answered = True
                elif not writable:
                    pytest.fail(f"the gateway neither read nor answered for {timeout:.0f} s ({sent} bytes sent)")
                else:
                    try:
                        written = sock.send(pending)
                    except (BrokenPipeError, ConnectionResetError):
                        answered = True
                        break
                    pending, sent = pending[written:], sent + written
            if answered:
                break
        answer = b""
        while b"\r\n" not in answer:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                pytest.fail(f"no answer from the gateway within {timeout:.0f} s ({sent} bytes of the body sent)")
            if not data:
                break
            answer += data
    return answer.split(b"\r\n", 1)[0].decode(), sent


def test_oversize_upload_refused_before_reading(gateway, api_key):
    auth = f"Authorization: Bearer {api_key}\r\n"
    # a Content-Length over the limit and no body at all: answered 413 from the header alone
    start = time.monotonic()
    status, _ = _exchange(gateway.port, f"POST /v1/detect HTTP/1.1\r\nHost: gw\r\n{auth}"
                                        f"Content-Type: image/jpeg\r\nContent-Length: {50 * 1024 ** 3}\r\n\r\n")
    assert status.startswith("HTTP/1.1 413 ") and time.monotonic() - start < 5, status
    # chunked (no length): refused once the limit is passed, long before the 64 MiB offered
    chunk = b"%x\r\n%s\r\n" % (65536, b"\0" * 65536)
    status, sent = _exchange(gateway.port, f"POST /v1/ocr HTTP/1.1\r\nHost: gw\r\n{auth}"
                                           "Transfer-Encoding: chunked\r\n\r\n", [chunk] * 1024)
    assert status.startswith("HTTP/1.1 413 "), status
    assert sent < 16 * IMAGE_LIMIT, f"{sent} bytes were sent before the 413"
    # the same over multipart, from its Content-Length
    big = httpx.post(f"{gateway.url}/v1/detect", files={"file": ("big.jpg", b"\0" * (IMAGE_LIMIT + 1))},
                     headers={"Authorization": f"Bearer {api_key}"})
    assert big.status_code == 413 and big.json()["error"]["code"] == "payload_too_large"


def test_empty_and_malformed_bodies(http):
    for response in (raw(http, "/v1/detect", b""), raw(http, "/v1/transcribe", b""),
                     http.post("/v1/ocr", files={"file": ("empty.jpg", b"")}),
                     http.post("/v1/ocr", files={"other": ("x.jpg", b"abc")}),
                     raw(http, "/v1/ocr", b"--x\r\nnonsense", "multipart/form-data; boundary=x")):
        assert response.status_code == 400, response.text
        assert response.json()["error"]["message"]
    bad = raw(http, "/v1/detect", b"abc", conf=2)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_parameter"
    bad = raw(http, "/v1/transcribe", b"abc", task="sing")
    assert bad.status_code == 400 and "task" in bad.json()["error"]["message"]


@pytest.mark.parametrize("path", [pytest.param("/v1/detect", marks=pytest.mark.yolo),
                                  pytest.param("/v1/transcribe", marks=pytest.mark.whisper),
                                  pytest.param("/v1/ocr", marks=pytest.mark.easyocr)])
def test_garbage_is_the_models_400(http, path):
    response = raw(http, path, random.Random(path).randbytes(3000))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_input" and len(error["message"]) > 10


# -- Triton down, readiness, service endpoints -------------------------------------------------------------------

def test_triton_down_is_503_quickly(down):
    start = time.monotonic()
    ready = httpx.get(f"{down.url}/readyz", timeout=30)
    detect = httpx.post(f"{down.url}/v1/detect", content=IMAGE.read_bytes(), timeout=30)  # --no-auth: no key
    assert time.monotonic() - start < 5
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
    assert detect.status_code == 503 and detect.json()["error"]["code"] == "unavailable"
    assert int(detect.headers["Retry-After"]) > 0
    assert httpx.get(f"{down.url}/healthz").json() == {"status": "ok"}


@pytest.mark.yolo
def test_triton_too_slow_is_504(triton):
    with Running(Settings(triton=triton.grpc_url, auth=False, timeout=0.001)) as hurried:
        response = httpx.post(f"{hurried.url}/v1/detect", content=IMAGE.read_bytes(), timeout=30)
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout", response.text


def test_a_gateway_without_jobs_names_where_they_are(tmp_path, monkeypatch):
    """`--no-jobs` / TRIDENT_GATEWAY_JOBS=0 (the scaled replicas in Kubernetes): every job route answers 404 naming
    where jobs go, and nothing of the jobs' state is created."""
    monkeypatch.setenv("TRIDENT_GATEWAY_JOBS", "0")
    settings = Settings.from_env()
    assert settings.jobs is False
    settings.triton, settings.auth, settings.data_dir = f"127.0.0.1:{free_port()}", False, tmp_path / "data"
    with Running(settings) as gateway, api_client(gateway.url, timeout=30) as http:
        answers = [http.post("/v1/analyze", files={"file": ("a.jpg", IMAGE.read_bytes())}),
                   http.get("/v1/jobs/abc"), http.get("/v1/jobs/abc/result"), http.delete("/v1/jobs/abc")]
        for answer in answers:
            assert answer.status_code == 404 and answer.json()["error"]["code"] == "jobs_not_served", answer.text
            assert "/v1/analyze" in answer.json()["error"]["message"]
        assert http.get("/healthz").json() == {"status": "ok"}
    assert not settings.data_dir.exists()


def test_cors_only_where_configured(down, gateway):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization"}
    allowed = httpx.options(f"{down.url}/v1/detect", headers=preflight)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.options(f"{down.url}/v1/detect", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    off = httpx.get(f"{gateway.url}/healthz", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in off.headers


def test_ready_with_every_model(gateway, triton):
    ready = httpx.get(f"{gateway.url}/readyz")  # no key needed
    assert ready.status_code == 200, ready.text
    assert set(ready.json()["models"]) >= {"detect" if m == "yolo" else m for m in selected_models()}
    assert set(ready.json()["models"].values()) == {"READY"}


def _counter(text: str, route: str, status: int) -> float:
    pattern = (rf'^trident_gateway_requests_total\{{(?=[^}}]*route="{re.escape(route)}")'
               rf'(?=[^}}]*status="{status}")[^}}]*\}} (\S+)$')
    return sum(float(v) for v in re.findall(pattern, text, re.M))


def test_metrics_and_access_log(gateway, api_key):
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("trident_gateway.access")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        before = httpx.get(f"{gateway.url}/metrics").text  # no key needed
        for _ in range(3):
            httpx.post(f"{gateway.url}/v1/ocr", content=b"")  # 401
        httpx.post(f"{gateway.url}/v1/ocr", content=b"", headers={"Authorization": f"Bearer {api_key}"})  # 400
        after = httpx.get(f"{gateway.url}/metrics").text
    finally:
        logger.removeHandler(handler)
    assert _counter(after, "/v1/ocr", 401) - _counter(before, "/v1/ocr", 401) == 3
    assert _counter(after, "/v1/ocr", 400) - _counter(before, "/v1/ocr", 400) == 1
    assert re.search(r'^trident_gateway_request_duration_seconds_bucket\{[^}]*route="/v1/ocr"', after, re.M)
    assert re.search(r"^trident_gateway_requests_in_flight \S+$", after, re.M)
    records = [json.loads(line) for line in lines]
    assert [r["status"] for r in records if r["path"] == "/v1/ocr"] == [401, 401, 401, 400]
    keyed = [r for r in records if r["status"] == 400][0]
    assert keyed["key"] == "tester" and keyed["method"] == "POST" and keyed["client"].startswith("127.0.0.1:")
    assert keyed["duration_ms"] >= 0 and all(api_key not in line for line in lines)


def test_docs_list_the_endpoints(gateway):
    docs = httpx.get(f"{gateway.url}/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text
    spec = httpx.get(f"{gateway.url}/openapi.json").json()
    for path in ("/v1/detect", "/v1/transcribe", "/v1/ocr"):
        body = spec["paths"][path]["post"]["requestBody"]["content"]
        assert {"multipart/form-data", "application/octet-stream"} <= set(body)
    names = {p["name"] for p in spec["paths"]["/v1/transcribe"]["post"]["parameters"]}
    assert names == {"language", "task", "temperature", "word_timestamps"}
    assert {"/healthz", "/readyz", "/metrics"} <= set(spec["paths"])


CHROMIUM = shutil.which("chromium")
ENDPOINTS = {"/v1/detect", "/v1/transcribe", "/v1/ocr", "/v1/analyze", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/result",
             "/healthz", "/readyz", "/metrics"}


def test_docs_render_offline_in_chromium(down, tmp_path):
    """/docs in headless Chromium (Debian's package) that can resolve no host but the gateway's: Swagger UI, served
    by the gateway itself, lists every endpoint. The screenshot goes to TRIDENT_DOCS_PNG when set (the README's
    docs/gateway-docs.png)."""
    assert CHROMIUM, "Debian's chromium package is needed (apt-get install chromium)"
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--virtual-time-budget=10000", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
               "--window-size=1280,1020"]
    dom = subprocess.run([*browser, "--dump-dom", f"{down.url}/docs"], capture_output=True, text=True, timeout=120)
    assert set(re.findall(r'class="opblock-summary-path" data-path="([^"]+)"', dom.stdout)) == ENDPOINTS, \
        dom.stderr[-2000:]
    png = Path(os.environ.get("TRIDENT_DOCS_PNG") or tmp_path / "docs.png")
    subprocess.run([*browser, f"--screenshot={png}", f"{down.url}/docs"], capture_output=True, timeout=120,
                   check=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000  # drawn, not blank


# -- fuzz --------------------------------------------------------------------------------------------------------

def test_fuzz_never_500(gateway, http):
    rng = random.Random(19)
    paths = [ENDPOINT_OF[m] for m in selected_models()]
    image = IMAGE.read_bytes()
    content_types = ["application/octet-stream", "image/jpeg", "audio/wav", "text/plain", "application/json",
                     "multipart/form-data", "multipart/form-data; boundary=zz", "multipart/form-data; boundary=",
                     "", "x/\u00e9", "multipart/mixed; boundary=a"]
    values = ["", "0", "1", "-1", "0.5", "nan", "inf", "1e309", "en", "ko", "zz", "true", "translate", "x" * 300,
              "\u00e9\u00e8", "[1,2]"]
    codes = []
    for i in range(30):
        kind = rng.random()
        if kind < 0.4:
            body = rng.randbytes(rng.randrange(1, 4000))
        elif kind < 0.7:
            body = image[: rng.randrange(1, len(image))]  # truncated image
        else:
            body = b"--zz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\n" + \
                   rng.randbytes(rng.randrange(0, 500)) + rng.choice([b"\r\n--zz--\r\n", b""])
        params = {rng.choice(["conf", "iou", "language", "task", "temperature", "word_timestamps", "junk"]):
                  rng.choice(values) for _ in range(rng.choice([0, 0, 1, 2]))}
        headers = {"Content-Type": rng.choice(content_types).encode("utf-8")}
        path = rng.choice(paths) if rng.random() < 0.9 else rng.choice(["/v1/nowhere", "/healthz", "/v1"])
        response = http.post(path, content=body, params=params, headers=headers)
        assert response.status_code != 500 and (response.status_code < 500 or response.status_code in (502, 503, 504)), \
            f"request {i}: {response.status_code} {response.text}"
        answer = response.json()
        codes.append(answer["error"]["code"] if response.status_code != 200 else "ok")
    assert httpx.get(f"{gateway.url}/healthz").status_code == 200
    # the fuzz got past the gateway's own checks to the models, which refused what they could not decode
    assert codes.count("invalid_input") >= 5, codes
