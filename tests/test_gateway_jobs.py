"""The REST gateway's analysis jobs (POST /v1/analyze, /v1/jobs/{id}) run for real by uvicorn in front of the
session's real Triton server (synthetic weights), on the 320x180 copy of the generated test video.

Kept short for a CPU: the job compared with `trident analyze` samples 2 frames (0.1 frame/s) with greedy Whisper;
the runs that are cut short (cancelled, interrupted by a restart) use the video without its audio track, so that
no soundtrack request goes on in Triton after them; the restart's queued job and the retention's are an image.
"""
from __future__ import annotations

import json
import math
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import DATA
from tests.test_gateway import Running, _exchange, api_client
from trident.analyze import pipeline
from trident.analyze.results import Options
from trident_gateway import Settings, keys
from trident_gateway.jobs import RESTARTED

pytestmark = [pytest.mark.yolo, pytest.mark.whisper, pytest.mark.easyocr]
FPS = 0.1  # 2 frames of the 20 s video
LONG_FPS = 2.0  # 40 frames: a run that lasts long enough to be cut
IMAGE = DATA / "ocr_en_sign.jpg"
VIDEO_LIMIT = 4 * 1024 * 1024
WAIT = 300.0  # seconds a job may take on a busy 2-core machine


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gateway_jobs") / "keys.json"


@pytest.fixture(scope="module")
def owner_key(keys_file) -> str:
    return keys.create(keys_file, "owner")


@pytest.fixture(scope="module")
def other_key(keys_file, owner_key) -> str:
    return keys.create(keys_file, "other")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gateway_data")


@pytest.fixture(scope="module")
def gateway(triton, keys_file, owner_key, data_dir):
    with Running(Settings(triton=triton.grpc_url, keys_file=keys_file, data_dir=data_dir,
                          max_video_bytes=VIDEO_LIMIT)) as running:
        yield running


def client(url: str, key: str | None = None) -> httpx.Client:
    return api_client(url, key, timeout=60)


@pytest.fixture(scope="module")
def http(gateway, owner_key):
    with client(gateway.url, owner_key) as session:
        yield session


@pytest.fixture(scope="module")
def video(media_dir) -> Path:
    return media_dir / "small.mp4"


@pytest.fixture(scope="module")
def silent(video, tmp_path_factory) -> Path:
    """The small video without its audio track: frames only."""
    path = tmp_path_factory.mktemp("silent") / "silent.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(video), "-an", "-c", "copy",
                    "-movflags", "+faststart", str(path)], check=True)
    return path


def submit(http: httpx.Client, path: Path, **fields) -> dict:
    response = http.post("/v1/analyze", files={"file": (path.name, path.read_bytes())},
                         data={k: str(v) for k, v in fields.items()})
    assert response.status_code == 202, response.text
    job = response.json()
    assert set(job) == {"id", "status", "links"} and response.headers["Location"] == f"/v1/jobs/{job['id']}"
    return job


def wait_for(http: httpx.Client, job_id: str, done=lambda job: job["status"] not in ("queued", "running"),
             timeout: float = WAIT) -> dict:
    """The job's view once `done(view)` (by default: once it is finished)."""
    deadline = time.monotonic() + timeout
    while True:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if done(job):
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['status']} after {timeout:.0f} s: {job}"
        time.sleep(0.2)


def comparable(document: dict) -> dict:
    """analysis.json without what differs between two runs of the same input: times, and where the input lay."""
    summary = {k: v for k, v in document["summary"].items()
               if k not in ("wall_seconds", "realtime_factor", "decode_seconds", "model_seconds")}
    inputs = [{**{k: v for k, v in f.items() if k != "timings"}, "path": Path(f["path"]).name}
              for f in document["inputs"]]
    return {**{k: v for k, v in document.items() if k != "created"}, "summary": summary, "inputs": inputs}


def detected(triton) -> float:
    """Requests `detect` has answered since the server started."""
    return triton.metrics().get(("nv_inference_request_success", "detect"), 0.0)


def assert_close(got, expected, where: str = "") -> None:
    """Equal, numbers to 1e-4: the recogniser batches a frame's text crops with whatever else is queued."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), where
        for key in expected:
            assert_close(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), where
        for n, (a, b) in enumerate(zip(got, expected)):
            assert_close(a, b, f"{where}[{n}]")
    elif isinstance(expected, float) and not isinstance(got, bool):
        assert math.isclose(got, expected, abs_tol=1e-4), f"{where}: {got} != {expected}"
    else:
        assert got == expected, f"{where}: {got!r} != {expected!r}"


@pytest.fixture(scope="module")
def reference(triton, video, tmp_path_factory) -> Path:
    """`trident analyze`'s output folder for the small video, at the jobs' options."""
    out = tmp_path_factory.mktemp("reference")
    pipeline.analyze([video], triton.grpc_url, "grpc", Options(fps=FPS, temperature=[0.0]), out=out, timeout=600)
    return out


@pytest.fixture(scope="module")
def finished(http, video) -> tuple[dict, list[dict]]:
    """A job on the small video, run to its end: its final view, and every view seen while it ran."""
    job = submit(http, video, fps=FPS, temperature=0)
    seen: list[dict] = []
    final = wait_for(http, job["id"], lambda view: seen.append(view) or view["status"] not in ("queued", "running"))
    return final, seen


# -- a job from upload to result ---------------------------------------------------------------------------------

def test_job_result_equals_trident_analyze(http, finished, reference):
    job, seen = finished
    assert job["status"] == "succeeded" and job["error"] is None, job
    assert {view["status"] for view in seen} <= {"queued", "running", "succeeded"}
    assert job["progress"] == {"fraction": 1.0, "frames_done": 2, "frames_total": 2}
    assert job["created"] <= job["started"] <= job["finished"] and job["files_expire"] > job["finished"]
    assert job["options"] == {"fps": FPS, "scenes": False, "language": None, "temperature": [0.0]}
    result = http.get(job["links"]["json"])
    assert result.status_code == 200 and result.headers["content-type"] == "application/json"
    document = result.json()
    assert document["inputs"][0]["path"] == "small.mp4"  # the client's name, not where the gateway kept it
    expected = json.loads((reference / "analysis.json").read_text())
    assert len(expected["inputs"][0]["frames"]) == 2 and expected["inputs"][0]["transcript"]["segments"]
    assert_close(comparable(document), comparable(expected))


def test_subtitles_and_report(http, finished, reference):
    job, _ = finished
    for format, content_type in (("srt", "application/x-subrip"), ("vtt", "text/vtt")):
        response = http.get(f"/v1/jobs/{job['id']}/result", params={"format": format})
        assert response.status_code == 200 and response.headers["content-type"].startswith(content_type)
        assert response.text == (reference / f"small.{format}").read_text() and "-->" in response.text
    report = http.get(job["links"]["html"])
    assert report.status_code == 200 and report.headers["content-type"] == "text/html; charset=utf-8"
    assert report.headers["content-security-policy"] == "sandbox allow-scripts"
    assert report.text.lower().startswith("<!doctype html>") and "small.mp4" in report.text
    assert "Trident analysis" in report.text and "data:image/jpeg;base64," in report.text  # the frames, inlined
    unknown = http.get(f"/v1/jobs/{job['id']}/result", params={"format": "pdf"})
    assert unknown.status_code == 400


def test_raw_body_job_of_an_image(http):
    response = http.post("/v1/analyze", params={"filename": "sign.jpg"}, content=IMAGE.read_bytes(),
                         headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 202, response.text
    job = wait_for(http, response.json()["id"])
    assert job["status"] == "succeeded" and job["filename"] == "sign.jpg", job
    document = http.get(job["links"]["json"]).json()
    assert [f["time"] for f in document["inputs"][0]["frames"]] == [0.0] and document["inputs"][0]["kind"] == "image"
    nothing = http.get(job["links"]["srt"])  # an image has no transcript
    assert nothing.status_code == 404 and nothing.json()["error"]["code"] == "no_transcript"


# -- cancellation, refusals --------------------------------------------------------------------------------------

def test_cancel_running_job(http, triton, silent, data_dir):
    before = detected(triton)
    job = submit(http, silent, fps=LONG_FPS)
    early = http.get(job["links"]["json"])
    assert early.status_code == 409 and early.json()["error"]["code"] == "not_finished"
    running = wait_for(http, job["id"], lambda view: view["status"] != "queued" and view["progress"]["frames_done"])
    assert running["status"] == "running" and running["progress"]["frames_total"] == 40, running
    assert 0 < running["progress"]["fraction"] < 1
    assert (data_dir / "jobs" / job["id"] / "input" / "silent.mp4").is_file()

    start = time.monotonic()
    cancelled = http.delete(f"/v1/jobs/{job['id']}")
    assert cancelled.status_code == 200 and time.monotonic() - start < 10, cancelled.text
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["files_removed"]
    assert not (data_dir / "jobs" / job["id"]).exists()
    assert http.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"  # still listed
    assert http.get(job["links"]["json"]).status_code == 410
    # the run stopped: the frames already sent are answered, then no more come, far short of the 40 of a whole run
    deadline = time.monotonic() + 60
    sent, now = -1.0, detected(triton)
    while now != sent:
        assert time.monotonic() < deadline, "detect requests kept coming a minute after the job was cancelled"
        sent = now
        time.sleep(1.5)
        now = detected(triton)
    assert sent - before < 40, f"all {sent - before:.0f} frames of the cancelled job went to detect"


def test_unknown_job_and_another_keys_job_are_404(gateway, http, finished, other_key):
    job, _ = finished
    for path in ("/v1/jobs/0123456789abcdef", "/v1/jobs/0123456789abcdef/result"):
        missing = http.get(path)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert http.delete("/v1/jobs/0123456789abcdef").status_code == 404
    with client(gateway.url, other_key) as other:
        for answer in (other.get(f"/v1/jobs/{job['id']}"), other.get(job["links"]["json"]),
                       other.delete(f"/v1/jobs/{job['id']}")):
            assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found"
    with client(gateway.url) as anonymous:
        assert anonymous.get(f"/v1/jobs/{job['id']}").status_code == 401
    assert http.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"  # the owner's DELETE was refused


def test_oversize_upload_refused(gateway, http, owner_key, data_dir):
    jobs_before = set((data_dir / "jobs").iterdir())
    auth = f"Authorization: Bearer {owner_key}\r\n"
    start = time.monotonic()
    status, _ = _exchange(gateway.port, f"POST /v1/analyze?filename=big.mp4 HTTP/1.1\r\nHost: gw\r\n{auth}"
                                        f"Content-Length: {50 * 1024 ** 3}\r\n\r\n")
    assert status.startswith("HTTP/1.1 413 ") and time.monotonic() - start < 5, status
    chunk = b"%x\r\n%s\r\n" % (65536, b"\0" * 65536)
    status, sent = _exchange(gateway.port, f"POST /v1/analyze?filename=big.mp4 HTTP/1.1\r\nHost: gw\r\n{auth}"
                                           "Transfer-Encoding: chunked\r\n\r\n", [chunk] * 1024)
    assert status.startswith("HTTP/1.1 413 ") and sent < 16 * VIDEO_LIMIT, (status, sent)
    big = http.post("/v1/analyze", files={"file": ("big.mp4", b"\0" * (VIDEO_LIMIT + 1))})
    assert big.status_code == 413 and big.json()["error"]["code"] == "payload_too_large"
    text = http.post("/v1/analyze", files={"file": ("notes.txt", b"not media")})
    assert text.status_code == 415 and text.json()["error"]["code"] == "unsupported_media_type"
    both = http.post("/v1/analyze", params={"fps": 1, "scenes": "true", "filename": "a.mp4"}, content=b"x")
    assert both.status_code == 400 and "per scene" in both.json()["error"]["message"]
    assert set((data_dir / "jobs").iterdir()) == jobs_before  # nothing of the refused uploads is left


def stalled(port: int, head: str, body: bytes, timeout: float = 30.0) -> tuple[bytes, float]:
    """Send `head` and `body`, the start of a longer body, then nothing: the gateway's whole answer (read until it
    closes the connection; more than `timeout` s of silence fails) and the seconds it took."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode() + body)
        answer = b""
        try:
            while data := sock.recv(65536):
                answer += data
        except TimeoutError:
            pytest.fail(f"the gateway kept a stalled upload's connection for {timeout:.0f} s: {answer[:200]!r}")
    return answer, time.monotonic() - start


def test_stalled_upload_refused(triton, keys_file, owner_key, tmp_path):
    """An upload that stops sending is answered 408 body_timeout once nothing came for the body timeout, its
    connection closed and nothing of it kept: a raw video upload (spooled to disk) and a chunked audio one (read
    into memory)."""
    auth = f"Authorization: Bearer {owner_key}\r\n"
    uploads = [(f"POST /v1/analyze?filename=clip.mp4 HTTP/1.1\r\nHost: gw\r\n{auth}Content-Length: 100000\r\n\r\n",
                b"\0" * 4096),
               (f"POST /v1/transcribe HTTP/1.1\r\nHost: gw\r\n{auth}Transfer-Encoding: chunked\r\n\r\n",
                b"1000\r\n" + b"\0" * 2048)]  # half a chunk
    with Running(Settings(triton=triton.grpc_url, keys_file=keys_file, data_dir=tmp_path, body_timeout=1.0)) as gw:
        for head, body in uploads:
            answer, took = stalled(gw.port, head, body)
            assert answer.startswith(b"HTTP/1.1 408 ") and b'"code":"body_timeout"' in answer, answer[:300]
            assert b"nothing came for 1 s after" in answer
            assert 1.0 <= took < 15, took
        assert not any((tmp_path / "jobs").iterdir())  # the stalled video's spool file and folder are gone
        with client(gw.url, owner_key) as http:  # and the gateway serves on
            assert http.get("/healthz").status_code == 200


# -- restart, retention ------------------------------------------------------------------------------------------

def test_restart_resumes_queued_and_fails_running(triton, keys_file, owner_key, silent, tmp_path):
    settings = Settings(triton=triton.grpc_url, keys_file=keys_file, data_dir=tmp_path, max_jobs=1,
                        jobs_db=tmp_path / "state" / "jobs.db")
    with Running(settings) as first, client(first.url, owner_key) as http:
        long = submit(http, silent, fps=LONG_FPS)
        queued = submit(http, IMAGE)  # waits: one job at a time
        wait_for(http, long["id"], lambda view: view["status"] == "running", timeout=60)
        assert http.get(f"/v1/jobs/{queued['id']}").json()["status"] == "queued"
    assert not first.thread.is_alive()
    with sqlite3.connect(tmp_path / "state" / "jobs.db") as db:  # the stopped gateway left the rows as they were
        assert dict(db.execute("SELECT id, status FROM jobs")) == {long["id"]: "running", queued["id"]: "queued"}

    with Running(settings) as second, client(second.url, owner_key) as http:
        failed = http.get(f"/v1/jobs/{long['id']}").json()
        assert failed["status"] == "failed" and failed["error"] == RESTARTED and failed["finished"]
        resumed = wait_for(http, queued["id"])
        assert resumed["status"] == "succeeded", resumed
        assert http.get(resumed["links"]["json"]).json()["inputs"][0]["kind"] == "image"


def test_retention_removes_files(triton, keys_file, owner_key, tmp_path):
    with Running(Settings(triton=triton.grpc_url, keys_file=keys_file, data_dir=tmp_path, job_retention=1.0,
                          sweep_interval=0.2)) as keeper, client(keeper.url, owner_key) as http:
        job = submit(http, IMAGE)
        done = wait_for(http, job["id"])
        assert done["status"] == "succeeded" and done["files_removed"] is None, done
        assert http.get(job["links"]["json"]).status_code == 200
        expired = wait_for(http, job["id"], lambda view: view["files_removed"] is not None, timeout=30)
        assert expired["status"] == "succeeded" and expired["files_expire"] is None
        gone = http.get(job["links"]["json"])
        assert gone.status_code == 410 and gone.json()["error"]["code"] == "expired"
        assert not (tmp_path / "jobs" / job["id"]).exists()
