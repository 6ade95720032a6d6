"""Liveness versus the stub supervisor (deploy/kubernetes, issue 17 item 11), on the real server and supervisor.

A reload the supervisor is running must not look dead: Triton's `/v2/health/live` (the pod's liveness probe)
stays green through it while `supervisor check` (the readiness probe) is red. A model whose reloads keep failing
must end the container: the supervisor gives up, stops tritonserver and exits with GAVE_UP, so Kubernetes or
compose restarts it, without any probe having to judge the models.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from trident_serving import server, supervisor

# A Python model that echoes its input; files next to its model.py steer its next initialize(): `slow` holds
# seconds to sleep, `broken` makes it fail (what a model whose weights vanished or no longer fit does).
MODEL_PY = textwrap.dedent('''\
    import os
    import time

    import triton_python_backend_utils as pb_utils

    HERE = os.path.dirname(os.path.abspath(__file__))


    class TritonPythonModel:
        def initialize(self, args):
            if os.path.exists(os.path.join(HERE, "broken")):
                raise RuntimeError("broken on purpose")
            if os.path.exists(os.path.join(HERE, "slow")):
                time.sleep(float(open(os.path.join(HERE, "slow")).read()))

        def execute(self, requests):
            return [pb_utils.InferenceResponse([pb_utils.Tensor("OUT", pb_utils.get_input_tensor_by_name(
                request, "IN").as_numpy())]) for request in requests]
''')
CONFIG = textwrap.dedent('''\
    name: "{name}"
    backend: "python"
    max_batch_size: 0
    input [ {{ name: "IN" data_type: TYPE_FP32 dims: [ 1 ] }} ]
    output [ {{ name: "OUT" data_type: TYPE_FP32 dims: [ 1 ] }} ]
    instance_group [ {{ count: 1 kind: KIND_CPU }} ]
''')
SLOW_RELOAD_S = 3.0
RELOAD_ATTEMPTS = 2


def echo_repository(root: Path, names: list[str]) -> Path:
    for name in names:
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(CONFIG.format(name=name))
        (root / name / "1" / "model.py").write_text(MODEL_PY)
    return root


def live(http: str) -> bool:
    """Triton's liveness endpoint, as the kubelet's httpGet probe reads it (2xx/3xx = alive)."""
    try:
        with urllib.request.urlopen(f"http://{http}/v2/health/live", timeout=2) as response:
            return 200 <= response.status < 400
    except OSError:
        return False


def stub_of(process: subprocess.Popen, model: str) -> supervisor.Stub:
    stubs = supervisor.find_stubs(supervisor.triton_pid(process.pid))
    return next(s for s in stubs.values() if s.model == model)


@pytest.fixture
def supervised(tmp_path):
    """`python -m trident_serving.supervisor` (fast retries, 2 attempts) over the bundled tritonserver serving two
    echo models, as the container runs it; yields (process, HTTP address, log file, repository)."""
    repository = echo_repository(tmp_path / "models", ["slow_reload", "failing_reload"])
    http = server.free_port()
    log = tmp_path / "supervisor.log"
    command = [sys.executable, "-m", "trident_serving.supervisor", "--interval", "0.2",
               f"--reload-attempts={RELOAD_ATTEMPTS}", "--retry-delays", "0.2", "--",
               str(server.bundle() / "bin" / "tritonserver"), f"--model-repository={repository}",
               f"--backend-directory={server.prepare_backends(tmp_path / 'run')}", f"--http-port={http}",
               f"--grpc-port={server.free_port()}", f"--metrics-port={server.free_port()}",
               "--model-control-mode=explicit", "--load-model=*", "--exit-timeout-secs=2"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=server.server_env(),
                                   start_new_session=True)
    address, began = f"127.0.0.1:{http}", time.time()
    try:
        deadline = time.monotonic() + 120
        # ready, and the supervisor has looked at both models' stubs: a stub killed before its first look would
        # never be missed (a fresh-clone CI once killed one 0.3 s after ready, before that look)
        while not (supervisor.check(address)[0] and all(f"watching model '{name}'" in log.read_text(errors="replace")
                                                        for name in ("slow_reload", "failing_reload"))):
            assert process.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the echo models did not load (and get watched) in time"
            time.sleep(0.2)
        yield process, address, log, repository
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        server.remove_stale_shared_memory(since=began)  # what killed stubs left in /dev/shm


def test_liveness_stays_green_through_a_reload_and_the_supervisor_ends_a_failed_one(supervised):
    process, http, log, repository = supervised

    # The readiness probe's command, timed here (the kubelet runs it every few seconds inside the pod).
    started = time.monotonic()
    probe = subprocess.run([sys.executable, "-m", "trident_serving.supervisor", "check", "--url", http,
                            "--timeout", "3"], capture_output=True, text=True, timeout=60)
    print(f"supervisor check: {time.monotonic() - started:.2f} s wall ({probe.stdout.strip()})")
    assert probe.returncode == 0, probe.stderr

    # 1. A slow reload that succeeds: liveness green throughout, readiness red until the model is READY again.
    (repository / "slow_reload" / "1" / "slow").write_text(str(SLOW_RELOAD_S))
    os.kill(stub_of(process, "slow_reload").pid, signal.SIGKILL)
    killed = time.monotonic()
    alive, red_for = [], 0.0
    while True:
        assert time.monotonic() - killed < 60, "slow_reload was not reloaded in time"
        alive.append(live(http))
        ok, why = supervisor.check(http, timeout=2)
        if not ok:
            red_for = time.monotonic() - killed
        elif red_for:
            break
        time.sleep(0.2)
    assert all(alive) and len(alive) > 5, alive
    assert red_for >= SLOW_RELOAD_S, red_for  # red while the reload ran, not just a blink
    assert process.poll() is None

    # 2. A reload that keeps failing: still live (the supervisor retries), red; then it gives up and exits.
    stubs = supervisor.find_stubs(supervisor.triton_pid(process.pid))
    (repository / "failing_reload" / "1" / "broken").touch()
    os.kill(stub_of(process, "failing_reload").pid, signal.SIGKILL)
    killed = time.monotonic()
    reds = []
    while process.poll() is None and "giving up" not in log.read_text(errors="replace"):
        assert time.monotonic() - killed < 60, "the supervisor did not give up in time"
        assert live(http), "liveness went red while the supervisor was still repairing"
        reds.append(not supervisor.check(http, timeout=2)[0])
        time.sleep(0.1)
    assert process.wait(timeout=60) == supervisor.GAVE_UP
    assert any(reds), "readiness never went red"
    text = log.read_text(errors="replace")
    assert text.count("reloading model 'failing_reload' failed") == RELOAD_ATTEMPTS, text[-3000:]
    assert f"failed (attempt {RELOAD_ATTEMPTS} of {RELOAD_ATTEMPTS})" in text and "giving up" in text
    # tritonserver was stopped with it, stubs included (the container's restart then starts everything afresh).
    assert not live(http)
    assert not [pid for pid in stubs if is_stub(pid)]


def is_stub(pid: int) -> bool:
    try:
        return supervisor.parse_stub(pid, supervisor.argv_of(Path(f"/proc/{pid}"))) is not None
    except OSError:  # gone
        return False


def test_check_is_red_for_an_empty_repository(tmp_path):
    """A model volume that was never filled serves nothing: readiness must not call that ready."""
    (tmp_path / "models").mkdir()
    options = server.on_free_ports(repository=tmp_path / "models", run_dir=tmp_path / "run", ready_timeout=60)
    server.start(options)
    try:
        assert supervisor.check(f"127.0.0.1:{options.http_port}") == (False, "no models in the repository")
    finally:
        server.stop(options)


def test_supervisor_rejects_bad_retry_arguments():
    for flags in (["--reload-attempts=0"], ["--retry-delays", "5,soon"], ["--retry-delays=-1"]):
        done = subprocess.run([sys.executable, "-m", "trident_serving.supervisor", *flags, "--", "true"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "error:" in done.stderr, (flags, done.stderr)
