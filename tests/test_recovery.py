"""Stub death and recovery (trident_serving.supervisor): the bookkeeping on real processes, then a real server
whose stubs are SIGKILLed under load (a server of its own: the shared test server must not lose stubs)."""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import IO

import pytest

from perf.scaleout import served_models
from trident import Client, InvalidInputError, ServerError, ServerUnavailableError
from trident_serving import supervisor
from trident_serving.supervisor import STUB, Stub, StubWatch, find_stubs, parse_stub

DATA = Path(__file__).resolve().parent / "data"


def stub_argv(repo: Path, model: str, instance: str) -> list[str]:
    """A stub's command line as Triton 2.51 writes it."""
    return [f"/opt/tritonserver/backends/python/{STUB}", f"{repo}/{model}/1/model.py",
            "triton_python_backend_shm_region_0f3c", "67108864", "67108864", "4242",
            "/opt/tritonserver/backends/python", "336", instance, "DEFAULT"]


def test_parse_stub():
    assert parse_stub(7, stub_argv(Path("/models"), "my_model_2", "my_model_2_0_1")) == Stub(7, "my_model_2",
                                                                                          "my_model_2_0_1")
    assert parse_stub(7, ["/usr/bin/python3", "-m", "trident_serving.server"]) is None
    assert parse_stub(7, stub_argv(Path("/models"), "m", "m_0_0")[:5]) is None


@pytest.fixture
def fake_stubs(tmp_path):
    """Start real processes whose command lines are stubs' (a Python symlinked under the stub's name runs a
    sleeping model.py), children of this test process; yields a start function, kills them all at the end."""
    binary = tmp_path / STUB
    binary.symlink_to(sys.executable)
    started = []

    def start(model: str, instance: str) -> subprocess.Popen:
        script = tmp_path / model / "1" / "model.py"
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text("import time\ntime.sleep(120)\n")
        argv = stub_argv(tmp_path, model, instance)
        process = subprocess.Popen([str(binary), str(script), *argv[2:]])
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()


def test_find_stubs_sees_only_live_stubs_of_its_server(fake_stubs):
    whisper, ocr = fake_stubs("whisper", "whisper_0_0"), fake_stubs("easyocr", "easyocr_0_0")
    deadline = time.monotonic() + 10
    while len(find_stubs(os.getpid())) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert find_stubs(os.getpid()) == {whisper.pid: Stub(whisper.pid, "whisper", "whisper_0_0"),
                                       ocr.pid: Stub(ocr.pid, "easyocr", "easyocr_0_0")}
    assert find_stubs(os.getppid()) == {}  # another server's stubs are not ours
    whisper.send_signal(signal.SIGKILL)
    stat = Path(f"/proc/{whisper.pid}/stat")
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":  # not reaped: a zombie keeps its /proc entry...
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert set(find_stubs(os.getpid())) == {ocr.pid}  # ...and is not a live stub


def stubs(*items: tuple[int, str]) -> dict[int, Stub]:
    return {pid: Stub(pid, model, f"{model}_0_{pid}") for pid, model in items}


def test_stub_watch():
    watch = StubWatch()
    ready = {"whisper": "READY", "easyocr": "READY"}
    assert watch.update(stubs((1, "whisper"), (2, "easyocr"), (3, "easyocr")), ready) == {}
    assert watch.update(stubs((1, "whisper"), (2, "easyocr")), ready) == {"easyocr": [3]}  # one of two instances
    # the model is being reloaded: its stubs come and go without being deaths
    assert watch.update(stubs((1, "whisper")), {**ready, "easyocr": "UNLOADING"}) == {}
    assert watch.update(stubs((1, "whisper"), (4, "easyocr")), {**ready, "easyocr": "LOADING"}) == {}
    assert watch.update(stubs((1, "whisper"), (4, "easyocr")), ready) == {}
    assert watch.update(stubs((4, "easyocr")), ready) == {"whisper": [1]}
    assert watch.update(stubs((4, "easyocr")), ready) == {}  # reported once
    # an operator unloads a model: not a death either
    assert watch.update(stubs(), {"whisper": "READY", "easyocr": "UNAVAILABLE"}) == {}


def test_stub_watch_tells_a_swap_from_a_death():
    """`load` of a READY model (e.g. with a config override) starts new stubs, then the old ones exit: the model
    is not reloaded over the override. A stub that dies once the swap has settled is a death again."""
    watch = StubWatch(settle_seconds=10)
    ready = {"detect": "READY"}
    swap = lambda *pids: {pid: Stub(pid, "detect", "detect_0_0") for pid in pids}  # noqa: E731 - same instance
    assert watch.update(swap(1), ready, now=0) == {}
    assert watch.update(swap(1, 2), ready, now=1) == {}  # the new copy's stub starts...
    assert watch.update(swap(2), ready, now=2) == {}  # ...and the old one exits
    assert watch.update(swap(2), ready, now=20) == {}
    assert watch.update({}, ready, now=21) == {"detect": [2]}


@pytest.mark.parametrize("command, status", [("exit 3", 3), ("kill -9 $$", 137), ("exit 0", 0)])
def test_supervisor_returns_the_servers_exit_status(command, status):
    done = subprocess.run([sys.executable, "-m", "trident_serving.supervisor", "--", "sh", "-c", command],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == status
    assert "without --model-control-mode=explicit" in done.stderr  # says it cannot repair this server


def wait_for_line(stream: IO[str], wanted: str, timeout: float) -> str:
    """The first line of a child's pipe that contains `wanted`. A daemon thread reads the pipe, so a child that
    stays silent fails the test after `timeout` s rather than blocking a readline() for ever."""
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)  # end of file: the child closed the pipe or exited

    threading.Thread(target=read, daemon=True).start()
    deadline, seen = time.monotonic() + timeout, []
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            pytest.fail(f"no line containing {wanted!r} within {timeout:.0f} s; read so far: {seen}")
        if line is None:
            pytest.fail(f"the pipe closed without a line containing {wanted!r}; read: {seen}")
        if wanted in line:
            return line
        seen.append(line)


def test_supervisor_forwards_sigterm():
    process = subprocess.Popen([sys.executable, "-m", "trident_serving.supervisor", "--", "sleep", "60"],
                               stderr=subprocess.PIPE, text=True)
    try:
        wait_for_line(process.stderr, "supervising", timeout=30)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        process.kill()
        process.wait()


def test_supervisor_arguments():
    command = ["tritonserver", "--model-repository=/models", "--http-port=9000", "--model-control-mode=explicit"]
    assert supervisor.http_url(command) == "127.0.0.1:9000"
    assert supervisor.http_url(["tritonserver", "--http-port", "9001"]) == "127.0.0.1:9001"
    assert supervisor.http_url(["tritonserver"]) == "127.0.0.1:8000"
    assert supervisor.model_control(command) == "explicit"
    assert supervisor.main([]) == 2  # usage


# -- a real server whose stubs are killed under load ---------------------------------------------------------------

RECOVERY_BOUND_S = 240.0  # kill -> serving again; 6-67 s per model measured on a busy 2-core machine
# The load's deadline per call. Triton 2.51 never answers the requests a killed stub held when its model answers
# through response senders (whisper; server issue 7862): only the client's deadline ends them (README, "Stub
# recovery"). Shorter than the client's default 120 s, so the test does not wait that long; long enough for
# any call of the other models on a busy machine.
LOAD_DEADLINE_S = 60.0
# What each model under test is called with; `yolov8` is reached through `detect` (a BLS call per batch).
CALLS = {
    "yolov8": lambda client: client.detect(DATA / "ocr_en_sign.jpg"),
    "easyocr": lambda client: client.read_text(DATA / "ocr_en_sign.jpg"),
    "whisper": lambda client: client.transcribe(DATA / "speech_en.wav", temperature=[0.0]),
}
FAMILY = {"yolov8": "yolo", "easyocr": "easyocr", "whisper": "whisper"}


@pytest.fixture(scope="module")
def recovery_server(request, repository, tmp_path_factory):
    """A server of its own (supervised, as the launcher always starts it) on the session's exported models, with
    whisper served by the engine in `request.param`. The ctranslate2 server carries `detect` and `yolov8` beside
    whisper, so that a model whose stub was not killed is seen serving on it too."""
    from conftest import serve

    # the exported models, linked, with configs stripped of `model_warmup`: the reload is under test, not the
    # warm-up, and CI pays for every load of this server
    models = tmp_path_factory.mktemp("recovery_repository")
    exported = tuple(m.name for m in repository.iterdir() if (m / "config.pbtxt").is_file())
    if request.param == "ctranslate2":
        served_models(request.getfixturevalue("ct2_repository"), models, ("whisper",))
        exported = tuple(m for m in exported if m in ("detect", "yolov8"))
    served_models(repository, models, exported)
    with serve(models, tmp_path_factory.mktemp("recovery")) as started:
        yield started


class Load:
    """Clients calling every model of the server in a loop, recording (model, start, end, outcome) per call.

    The client's own errors are outcomes; anything else a thread raises (a bug in the client or here) stops that
    thread and fails the test when the block ends, instead of silently thinning the load."""

    def __init__(self, triton, models: list[str]):
        self.client = Client(triton.grpc_url, protocol="grpc", timeout=LOAD_DEADLINE_S)
        self.models, self.calls, self.stop = models, [], threading.Event()
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self.loop, args=(m,)) for m in models]  # one each: 2 CPU cores

    def loop(self, model: str) -> None:
        try:
            while not self.stop.is_set():
                start = time.monotonic()
                try:
                    CALLS[model](self.client)
                    outcome = "ok"
                except (ServerError, ServerUnavailableError, InvalidInputError) as exc:
                    outcome = f"{type(exc).__name__}: {exc}"
                self.calls.append((model, start, time.monotonic(), outcome))
        except BaseException as exc:  # noqa: BLE001 - collected, raised in the test's thread by __exit__
            self.errors.append(exc)

    def __enter__(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=150)
        assert not any(t.is_alive() for t in self.threads), "a request hung"
        if self.errors:
            raise AssertionError(f"{len(self.errors)} load thread(s) died: {self.errors!r}") from self.errors[0]


# (whisper's engine, the model whose stub is killed): every model on the openai server, whisper on ctranslate2's
VICTIMS = [*(pytest.param("openai", m, marks=getattr(pytest.mark, FAMILY[m]), id=m) for m in CALLS),
           pytest.param("ctranslate2", "whisper", marks=pytest.mark.whisper, id="whisper-ctranslate2")]


# scope="module": at the default (function) scope pytest would start the module's server again for every victim
@pytest.mark.parametrize("recovery_server, victim", VICTIMS, indirect=["recovery_server"], scope="module")
def test_killed_stub_is_detected_reported_and_reloaded(recovery_server, victim, capsys, request):
    from conftest import selected_models
    from trident import cli
    from trident.stats import scrape

    served = recovery_server.repository
    models = [m for m in CALLS if FAMILY[m] in selected_models() and (served / m).is_dir()]
    http = f"127.0.0.1:{recovery_server.options.http_port}"
    for model in models:  # every model serves before the kill
        CALLS[model](recovery_server.client("grpc"))
    triton_pid = supervisor.triton_pid(int(recovery_server.options.pid_file.read_text()))
    stub = next(s for s in find_stubs(triton_pid).values() if s.model == victim)
    red = {"check": False, "trident health": False}
    with Load(recovery_server, models) as load:
        time.sleep(2.0)
        killed = time.monotonic()
        os.kill(stub.pid, signal.SIGKILL)  # what the kernel's OOM killer does
        while True:
            assert time.monotonic() - killed < RECOVERY_BOUND_S, f"{victim} did not serve again in time"
            ok, _ = supervisor.check(http)
            red["check"] |= not ok
            if not ok and not red["trident health"]:
                red["trident health"] = cli.main(["--url", http, "--protocol", "http", "health"]) == 1
            if ok and red["check"]:
                try:
                    CALLS[victim](recovery_server.client("grpc"))
                    break
                except (ServerError, ServerUnavailableError):
                    pass
            time.sleep(0.3)
        recovered = time.monotonic()
        time.sleep(2.0)  # the load goes on for a while on the recovered model
    capsys.readouterr()
    print(f"{victim}: serving again {recovered - killed:.1f} s after the kill")
    assert red == {"check": True, "trident health": True}, "readiness never went red"
    after_kill = [c for c in load.calls if c[2] > killed]
    # In-flight and later requests of the victim (and of `detect`, which calls yolov8) failed cleanly...
    failed = Counter(outcome.split(":")[0] for model, _, _, outcome in after_kill if outcome != "ok")
    assert set(failed) <= {"ServerError", "ServerUnavailableError"}, failed
    assert all(model == victim for model, _, _, outcome in after_kill if outcome != "ok"), \
        "a model whose stub was not killed failed requests"
    # ...while the others kept serving (the victim's own service after the reload was checked above).
    for model in set(models) - {victim}:
        assert any(m == model and outcome == "ok" and end > killed for m, _, end, outcome in load.calls), model
    log = recovery_server.options.log_file.read_text(errors="replace")
    assert f"stub process [{stub.pid}] of model '{victim}' died: reloading the model" in log
    assert supervisor.check(http)[0]
    if victim == "whisper":  # the reloaded model is served by the same engine
        engine = request.node.callspec.params["recovery_server"]
        snapshot = scrape(f"http://127.0.0.1:{recovery_server.options.metrics_port}/metrics")
        assert snapshot.total("trident_whisper_engine_info", model="whisper", engine=engine) == 1


def test_stop_removes_the_shared_memory_regions_left_by_killed_processes():
    """A killed stub or server leaves its region in /dev/shm (RAM); `server.stop` deletes ours that no process
    maps any more, and keeps a mapped one."""
    from trident_serving import server

    since = time.time()
    stale, live = (server.SHM_REGIONS / f"{server.SHM_PREFIX}test-{kind}-{os.getpid()}" for kind in ("stale", "live"))
    for path in (stale, live):
        path.write_bytes(b"\0" * 4096)
    holder = subprocess.Popen([sys.executable, "-c", "import mmap, sys, time\nf = open(sys.argv[1], 'r+b')\n"
                               "m = mmap.mmap(f.fileno(), 0)\nprint('mapped', flush=True)\ntime.sleep(120)",
                               str(live)], stdout=subprocess.PIPE, text=True)
    try:
        wait_for_line(holder.stdout, "mapped", timeout=60)
        assert server.remove_stale_shared_memory(since=time.time() + 60) == []  # created before: not judged
        removed = server.remove_stale_shared_memory(since=since)
        assert stale.name in removed and not stale.exists()
        assert live.exists() and live.name not in removed
    finally:
        holder.kill()
        holder.wait()
        for path in (stale, live):
            path.unlink(missing_ok=True)


def test_supervisor_restarts_a_dying_server_a_bounded_number_of_times(tmp_path):
    """The restart bookkeeping on real processes: a command that always crashes is started 1 + N times, then the
    supervisor exits with its status; one that crashes once is started twice; without --restarts, once."""
    starts = tmp_path / "starts"
    crash = f"echo x >> {starts}; kill -SEGV $$"
    crash_once = f"echo x >> {starts}; [ $(wc -l < {starts}) -gt 1 ] || kill -SEGV $$"

    def supervise(script: str, *flags: str) -> tuple[int, int, str]:
        starts.unlink(missing_ok=True)
        done = subprocess.run([sys.executable, "-m", "trident_serving.supervisor", "--interval", "0.1", *flags, "--",
                               "sh", "-c", script], capture_output=True, text=True, timeout=120)
        return done.returncode, len(starts.read_text().split()), done.stderr

    code, runs, err = supervise(crash, "--restarts=2")
    assert (code, runs) == (139, 3) and "its 3rd crash within 600 s: giving up" in err
    code, runs, err = supervise(crash_once, "--restarts=2")
    assert (code, runs) == (0, 2) and "exited with 139: starting it again (restart 1 of at most 2" in err
    assert supervise(crash)[:2] == (139, 1)  # the container's default: exit, the restart policy decides


@pytest.mark.yolo
def test_a_crashed_tritonserver_is_started_again(repository, tmp_path):
    """tritonserver 2.51 itself can die (it segfaulted in libtriton_python when the OOM killer took a stub
    mid-execution): the launcher's supervisor starts it again and deletes the shared memory the dead one left."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    from conftest import serve
    from trident_serving import server

    models = tmp_path / "models"
    models.mkdir()
    (models / "yolov8").symlink_to(repository / "yolov8")
    images = grpcclient.InferInput("images", [1, 3, 640, 640], "FP32")
    images.set_data_from_numpy(np.zeros((1, 3, 640, 640), np.float32))
    with serve(models, tmp_path / "run") as started:
        http = f"127.0.0.1:{started.options.http_port}"
        before = supervisor.triton_pid(int(started.options.pid_file.read_text()))
        regions = server.mapped_shared_memory(before)
        assert regions, "the server maps no Python backend region"
        os.kill(before, signal.SIGSEGV)
        killed = time.monotonic()
        while True:
            assert time.monotonic() - killed < 180, "tritonserver was not started again in time"
            now = supervisor.triton_pid(int(started.options.pid_file.read_text()))
            if now != before and supervisor.check(http)[0]:
                break
            time.sleep(0.5)
        with grpcclient.InferenceServerClient(f"127.0.0.1:{started.options.grpc_port}") as client:
            assert client.infer("yolov8", [images]).as_numpy("output0").shape == (1, 84, 8400)
        log = started.options.log_file.read_text(errors="replace")
        assert "tritonserver exited with 139: starting it again (restart 1 of at most 3" in log
        assert not any((server.SHM_REGIONS / f"{server.SHM_PREFIX}{name}").exists() for name in regions)
