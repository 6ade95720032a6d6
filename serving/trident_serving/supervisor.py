"""Recovery from Python-backend stub deaths: `python -m trident_serving.supervisor -- tritonserver ARGS...`.

Each Python-model instance runs in its own stub process. When one dies (the kernel's OOM killer, a segfault
in a native library), Triton 2.51 does not restart it (the restart was disabled in 24.06, see
triton-inference-server/server issues 7347 and 8604): the model stays READY, `/v2/health/ready` stays green and
every request fails with "Stub process '<instance>' is not healthy" for as long as the server runs.

The supervisor runs tritonserver as its child and, once a second, lists the stub processes tritonserver
started (each stub's command line names its model file and instance). A stub that was there and is gone
(or a zombie) while its model is still READY is a death: the supervisor unloads that model and loads it again
through Triton's model-control API, which starts fresh stubs (so tritonserver must run with
`--model-control-mode=explicit`; `--load-model=*` loads every model at start, as the default mode does).
While the model is unloading and loading, Triton itself reports it (and, with strict readiness, the server)
not ready; `python -m trident_serving.supervisor check` (the container's health check) and `trident health`
also go red while any model of the repository is not READY, including one whose reload failed. A failed
reload is retried with backoff; after `--reload-attempts` failures the supervisor gives up: it stops tritonserver
and exits with GAVE_UP (75), so that the container is restarted afresh rather than serving without the model.
A liveness probe therefore needs no model check: the supervisor's exit is the verdict.

The supervisor forwards SIGTERM/SIGINT to tritonserver, exits with its exit status, and reaps orphans, so it
can be a container's PID 1. A tritonserver that itself dies (a crash, the OOM killer) makes it exit too, for the
container's restart policy; with `--restarts N` (the local launcher's choice) it starts tritonserver again, at
most N times within `--restart-window` seconds, after deleting the shared-memory regions the dead one left.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .server import ADMIN_HEADER, ADMIN_KEY_ENV, remove_stale_shared_memory

log = logging.getLogger("trident.supervisor")

STUB = "triton_python_backend_stub"
# Exit status when a model could not be reloaded (sysexits' EX_TEMPFAIL: a fresh start may well succeed).
GAVE_UP = 75


@dataclass(frozen=True)
class Stub:
    """One Python-backend stub process."""

    pid: int
    model: str  # the model's folder name in the repository
    instance: str  # e.g. "whisper_0_0"


@dataclass
class SupervisorOptions:
    url: str = "127.0.0.1:8000"  # tritonserver's HTTP endpoint (the model-control API)
    # Headers of the model-repository calls (index, load, unload): tritonserver's --http-restricted-api ones.
    headers: dict[str, str] = field(default_factory=dict)
    interval: float = 1.0  # seconds between two looks at the stub processes
    load_timeout: float = 900.0  # one load of one model (Whisper large on a busy GPU takes minutes)
    # A model whose reload fails this many times in a row (at once, then after each delay; the last delay
    # repeats) makes the supervisor give up: tritonserver is stopped and the supervisor exits with GAVE_UP.
    reload_attempts: int = 4
    retry_delays: tuple[float, ...] = (5.0, 15.0, 60.0)
    proc: Path = Path("/proc")
    # A tritonserver that dies on its own is started again up to `restarts` times per `restart_window` seconds.
    # 0 (the container's default): exit with its status and let compose or Kubernetes restart the container.
    restarts: int = 0
    restart_window: float = 600.0
    restart_delay: float = 2.0


def parse_stub(pid: int, argv: list[str]) -> Stub | None:
    """The Stub of a process's argv, or None if it is not a Python-backend stub.

    Triton 2.51 starts `triton_python_backend_stub <model_dir>/<version>/model.py <shm region> <shm size>
    <shm growth> <parent pid> <backend dir> <ipc handle> <instance name> <runtime model dir>`.
    """
    if len(argv) < 9 or os.path.basename(argv[0]) != STUB:
        return None
    model_file = Path(argv[1])
    return Stub(pid, model_file.parent.parent.name, argv[8])


def argv_of(entry: Path) -> list[str]:
    """The command line of the process `entry` (/proc/<pid>); raises OSError once it is gone."""
    return [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0") if a]


def find_stubs(server_pid: int, proc: Path = Path("/proc")) -> dict[int, Stub]:
    """The live (not zombie) stub processes whose parent is `server_pid`, by PID."""
    stubs = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = argv_of(entry)
        except OSError:  # exited meanwhile
            continue
        # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces and parentheses.
        state, ppid = stat[stat.rfind(")") + 2:].split()[:2]
        if int(ppid) != server_pid or state in ("Z", "X"):
            continue
        stub = parse_stub(int(entry.name), argv)
        if stub is not None:
            stubs[stub.pid] = stub
    return stubs


def triton_pid(pid: int, proc: Path = Path("/proc")) -> int:
    """The tritonserver process of `pid`: `pid` itself, or its tritonserver child when `pid` is a supervisor."""
    def name(entry: Path) -> str:
        try:
            return os.path.basename(argv_of(entry)[0])
        except (OSError, IndexError):  # gone, or a kernel thread (empty command line)
            return ""

    if name(proc / str(pid)) == "tritonserver":
        return pid
    for entry in proc.iterdir():
        if entry.name.isdigit() and name(entry) == "tritonserver":
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rfind(")") + 2:].split()[1]) == pid:
                return int(entry.name)
    return pid


@dataclass
class StubWatch:
    """Which models lost a stub since the last look: plain bookkeeping, fed with observations.

    A death is an instance (e.g. `easyocr_0_1`) of a READY model left without a live stub. Not deaths: stubs of
    models that are not READY (loading, unloading, unloaded by an operator), and the old stubs of a model that
    Triton swaps for a new copy while it stays READY (`load` again, e.g. with a config override): new stub PIDs
    appear first, then the old ones exit, so for `settle_seconds` after new PIDs show up the model's instances
    are taken as they are.
    """

    settle_seconds: float = 15.0
    known: dict[str, dict[str, int]] = field(default_factory=dict)  # model -> {instance: stub PID} while READY
    seen: dict[str, set[int]] = field(default_factory=dict)  # model -> every stub PID seen while READY
    settling: dict[str, float] = field(default_factory=dict)  # model -> monotonic time its swap is over

    def update(self, stubs: dict[int, Stub], states: dict[str, str],
               now: float | None = None) -> dict[str, list[int]]:
        """Record `stubs` (the live ones) and the models' `states`; returns {model: [dead PIDs]} for every READY
        model that lost an instance's stub (each death is reported once)."""
        now = time.monotonic() if now is None else now
        live: dict[str, dict[str, int]] = {}
        for stub in stubs.values():
            live.setdefault(stub.model, {})[stub.instance] = stub.pid
        dead = {}
        for model in set(self.known) | set(live):
            current = live.get(model, {})
            if states.get(model) != "READY":
                self._forget(model)
                continue
            if model in self.seen and set(current.values()) - self.seen[model]:
                self.settling[model] = now + self.settle_seconds  # Triton is swapping in a new copy
            self.seen.setdefault(model, set()).update(current.values())
            if now < self.settling.get(model, 0.0):
                self.known[model] = dict(current)
                continue
            missing = [pid for instance, pid in self.known.get(model, {}).items() if instance not in current]
            if missing:
                dead[model] = sorted(missing)
                self._forget(model)
            else:
                self.known[model] = {**self.known.get(model, {}), **current}
        return dead

    def _forget(self, model: str) -> None:
        for table in (self.known, self.seen, self.settling):
            table.pop(model, None)


class Triton:
    """The few calls of Triton's HTTP API the supervisor needs (stdlib only: the container has no tritonclient)."""

    def __init__(self, url: str, headers: dict[str, str] | None = None):
        self.base = url if url.startswith("http") else f"http://{url}"
        self.headers = dict(headers or {})  # sent with every call: the health API ignores them

    def _call(self, method: str, path: str, timeout: float) -> bytes:
        request = urllib.request.Request(self.base + path, method=method, data=b"" if method == "POST" else None,
                                         headers=self.headers)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()

    def states(self, timeout: float = 5.0) -> dict[str, str]:
        """{model: state} of the repository index (READY, LOADING, UNLOADING, UNAVAILABLE)."""
        index = json.loads(self._call("POST", "/v2/repository/index", timeout) or b"[]")
        return {m["name"]: m.get("state", "") for m in index}

    def ready(self, timeout: float = 5.0) -> bool:
        try:
            self._call("GET", "/v2/health/ready", timeout)
            return True
        except OSError:  # refused, timed out, or HTTP 400 (not ready)
            return False

    def reload(self, model: str, timeout: float) -> None:
        """Unload `model`, then load it again (returns once it is READY; raises if the load fails).

        The load does not wait for the unload: with its stub dead, Triton 2.51 may never finish unloading the
        old instance (seen with whisper, whose requests were queued in the dead stub: UNLOADING for 10 minutes),
        while a load started meanwhile brings up a new one, which serves."""
        self._call("POST", f"/v2/repository/models/{model}/unload", timeout)
        self._call("POST", f"/v2/repository/models/{model}/load", timeout)


def check(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> tuple[bool, str]:
    """Whether the server at `url` can serve every model of its repository: (ok, one line saying why not).

    Its two HTTP calls share `timeout` seconds, so that a probe with a timeout of its own gets an answer.
    `headers`: those of a restricted model-repository API (default: `admin_headers()`, from the environment)."""
    deadline = time.monotonic() + timeout
    triton = Triton(url, admin_headers() if headers is None else headers)
    try:
        states = triton.states(timeout)
    except (OSError, ValueError) as exc:
        return False, f"server at {url} unreachable: {exc}"
    if not states:
        return False, "no models in the repository"  # e.g. a model volume that was never filled
    not_ready = {m: s or "UNAVAILABLE" for m, s in states.items() if s != "READY"}
    if not_ready:
        return False, "models not ready: " + ", ".join(f"{m} ({s})" for m, s in sorted(not_ready.items()))
    if not triton.ready(max(0.1, deadline - time.monotonic())):
        return False, "server not ready"
    return True, f"ready: {', '.join(sorted(states))}"


class Supervisor:
    """Watches the stubs of one running tritonserver and reloads every model that lost one."""

    def __init__(self, server_pid: int, options: SupervisorOptions | None = None):
        self.server_pid = server_pid
        self.options = options or SupervisorOptions()
        self.triton = Triton(self.options.url, self.options.headers)
        self.watch = StubWatch()
        self.stubs: dict[int, Stub] = {}  # as last seen
        self.recovering: set[str] = set()  # models being reloaded (their stubs come and go)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.gave_up: str | None = None  # the model whose reloads all failed

    def poll(self) -> None:
        """One look: find dead stubs and start a reload for each model that lost one."""
        stubs = self.stubs = find_stubs(self.server_pid, self.options.proc)
        try:
            states = self.triton.states()
        except (OSError, ValueError):
            return  # not serving yet (loading at start) or shutting down: nothing to compare against
        with self.lock:
            states = {m: ("RECOVERING" if m in self.recovering else s) for m, s in states.items()}
            watched = {model for model, pids in self.watch.known.items() if pids}
            dead = self.watch.update(stubs, states)
            for model, pids in sorted(self.watch.known.items()):
                if pids and model not in watched:  # from now on their deaths are seen; one before this look is not
                    log.info("watching model %r: stub processes %s", model, sorted(pids.values()))
            for model, pids in dead.items():
                log.error("stub process %s of model %r died: reloading the model", pids, model)
                self.recovering.add(model)
                threading.Thread(target=self.recover, args=(model,), name=f"recover-{model}", daemon=True).start()

    def recover(self, model: str) -> None:
        """Reload `model` until it is READY again, backing off between failures; give up (stop supervising,
        `gave_up` set) after `reload_attempts` failures."""
        attempts, delays = self.options.reload_attempts, self.options.retry_delays
        try:
            for attempt in range(1, attempts + 1):
                if self.stopping.is_set():
                    return
                started = time.monotonic()
                try:
                    self.triton.reload(model, self.options.load_timeout)
                    log.warning("model %r reloaded in %.1f s after its stub died", model, time.monotonic() - started)
                    return
                except (OSError, ValueError) as exc:
                    if attempt == attempts:
                        log.error("reloading model %r failed (attempt %d of %d): %s; giving up: stopping "
                                  "tritonserver for a fresh start", model, attempt, attempts, _reason(exc))
                        self.gave_up = model
                        self.stopping.set()
                        return
                    delay = delays[min(attempt, len(delays)) - 1]
                    log.error("reloading model %r failed (attempt %d of %d): %s; retrying in %g s", model, attempt,
                              attempts, _reason(exc), delay)
                    self.stopping.wait(delay)
        finally:
            with self.lock:
                self.recovering.discard(model)

    def run(self, alive: Callable[[], bool]) -> None:
        """Poll every `interval` seconds while `alive()` and not stopping."""
        while alive() and not self.stopping.is_set():
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one bad look
                log.exception("supervisor poll failed")
            self.stopping.wait(self.options.interval)


def http_url(command: list[str]) -> str:
    """The loopback HTTP address of the tritonserver `command` (its --http-port, default 8000)."""
    return f"127.0.0.1:{_flag(command, '--http-port', '8000')}"


def restricted_headers(command: list[str]) -> dict[str, str]:
    """The header the tritonserver `command` asks for on its model-repository HTTP API
    (`--http-restricted-api=<category,...>:<header>=<value>`, given once or more), as {header: value}."""
    headers = {}
    for value in _flag_values(command, "--http-restricted-api"):
        categories, _, setting = value.partition(":")
        header, _, key = setting.partition("=")
        if "model-repository" in categories.split(",") and key:
            headers[header] = key
    return headers


def admin_headers(key: str | None = None) -> dict[str, str]:
    """The restricted model-repository API's header with `key` (default: $TRIDENT_ADMIN_KEY); {} without a key."""
    key = os.environ.get(ADMIN_KEY_ENV, "") if key is None else key
    return {ADMIN_HEADER: key} if key else {}


def model_control(command: list[str]) -> str:
    """The --model-control-mode of the tritonserver `command` (default none)."""
    return _flag(command, "--model-control-mode", "none")


def _flag(command: list[str], name: str, default: str) -> str:
    """The last value of `name` in `command` (see `_flag_values`), else `default`."""
    return (_flag_values(command, name) or [default])[-1]


def _flag_values(command: list[str], name: str) -> list[str]:
    """Every value of `name` in `command`, given as `name=value` or `name value` (getopt's two forms)."""
    values = []
    for i, arg in enumerate(command):
        if arg.startswith(name + "="):
            values.append(arg.split("=", 1)[1])
        elif arg == name and i + 1 < len(command):
            values.append(command[i + 1])
    return values


def run(command: list[str], options: SupervisorOptions) -> int:
    """Start `command` (tritonserver) and supervise its stubs until it exits; returns its exit status.

    With `options.restarts`, a tritonserver that dies on its own (a crash, the OOM killer) is started again, at
    most that many times within `options.restart_window` seconds; a signal to the supervisor is a shutdown.
    """
    if model_control(command) != "explicit":
        log.warning("tritonserver runs without --model-control-mode=explicit: a dead stub will be reported "
                    "but cannot be repaired (add --model-control-mode=explicit --load-model=*)")
    shutdown = threading.Event()
    current: list[tuple[subprocess.Popen, Supervisor]] = []

    def forward(signum, _frame):
        shutdown.set()
        if current:
            server, supervisor = current[-1]
            supervisor.stopping.set()  # stubs die on shutdown: not a failure to repair
            if server.poll() is None:
                server.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    crashes: list[float] = []
    while True:
        started = time.time()
        code = _supervise(command, options, current)
        if shutdown.is_set() or code == 0:
            return code
        # A failed repair counts as a crash: with restarts left, a fresh tritonserver loads every model again.
        what = "was stopped after a failed repair" if code == GAVE_UP else f"exited with {code}"
        now = time.monotonic()
        crashes = [t for t in crashes if now - t < options.restart_window] + [now]
        if len(crashes) > options.restarts:
            if options.restarts:
                log.error("tritonserver %s, its %d%s crash within %g s: giving up", what, len(crashes),
                          {1: "st", 2: "nd", 3: "rd"}.get(len(crashes), "th"), options.restart_window)
            return code
        removed = remove_stale_shared_memory(since=started)  # the dead server's regions are RAM until deleted
        log.error("tritonserver %s: starting it again (restart %d of at most %d within %g s; %d "
                  "shared-memory regions it left deleted)", what, len(crashes), options.restarts,
                  options.restart_window, len(removed))
        if shutdown.wait(options.restart_delay):
            return code


def _supervise(command: list[str], options: SupervisorOptions,
               current: list[tuple[subprocess.Popen, Supervisor]]) -> int:
    """One tritonserver process from start to exit; returns its exit status (128 + signal if killed)."""
    server = subprocess.Popen(command)
    supervisor = Supervisor(server.pid, options)
    current.append((server, supervisor))
    exit_status: list[int] = []

    def alive() -> bool:
        # Reap every exited child: as a container's PID 1 we inherit the orphans of tritonserver too.
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return not exit_status
            if pid == 0:
                return not exit_status
            if pid == server.pid:
                exit_status.append(os.waitstatus_to_exitcode(status))
                server.returncode = exit_status[0]

    log.info("supervising tritonserver (pid %d) at %s", server.pid, options.url)
    supervisor.run(alive)
    supervisor.stopping.set()
    if supervisor.gave_up and not exit_status:
        # Graceful: in-flight requests of the other models finish within tritonserver's exit timeout.
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(float(_flag(command, "--exit-timeout-secs", "30")) + 15)
        except subprocess.TimeoutExpired:
            server.kill()
    if not exit_status:
        exit_status.append(server.wait())
    end_orphans(supervisor.stubs, options.proc)
    if supervisor.gave_up:
        return GAVE_UP
    code = exit_status[0]
    return code if code >= 0 else 128 - code  # killed by a signal: the shell's convention


def end_orphans(stubs: dict[int, Stub], proc: Path = Path("/proc"), timeout: float = 10.0) -> None:
    """SIGKILL the stubs a dead tritonserver left (they would hold its shared memory until they notice), and
    wait until they are gone. A PID that is no longer a stub (exited, reused) is left alone."""
    def still_stubs() -> list[int]:
        found = []
        for pid in stubs:
            try:
                if parse_stub(pid, argv_of(proc / str(pid))) is not None:
                    found.append(pid)
            except OSError:
                pass
        return found

    for pid in still_stubs():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + timeout
    while still_stubs() and time.monotonic() < deadline:
        time.sleep(0.1)


def _seconds_list(text: str) -> tuple[float, ...]:
    """`--retry-delays 5,15,60` as (5.0, 15.0, 60.0)."""
    try:
        delays = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds separated by commas, e.g. 5,15,60; got {text!r}") from None
    if any(d < 0 for d in delays):
        raise argparse.ArgumentTypeError(f"delays cannot be negative: {text!r}")
    return delays


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        try:
            return f"HTTP {exc.code}: {json.loads(exc.read()).get('error', '')}"
        except (OSError, ValueError):
            return f"HTTP {exc.code}"
    return f"{type(exc).__name__}: {exc}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s trident-supervisor %(levelname)s: %(message)s")
    if argv[:1] == ["check"]:
        parser = argparse.ArgumentParser(prog="python -m trident_serving.supervisor check",
                                         description="Exit 0 if the server is ready and every model is READY. "
                                         f"A restricted model-repository API: the key in ${ADMIN_KEY_ENV}.")
        parser.add_argument("--url", default="127.0.0.1:8000", help="HTTP address (default 127.0.0.1:8000)")
        parser.add_argument("--timeout", type=float, default=5.0,
                            help="seconds the server's answers may take in all (default 5)")
        args = parser.parse_args(argv[1:])
        ok, message = check(args.url, args.timeout)
        print(message, file=sys.stdout if ok else sys.stderr)
        return 0 if ok else 1
    if "--" not in argv:
        print(__doc__.split("\n\n")[0] + "\nusage: python -m trident_serving.supervisor [--interval S] -- "
              "tritonserver ARGS...\n       python -m trident_serving.supervisor check [--url HOST:PORT] [--timeout S]",
              file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m trident_serving.supervisor")
    parser.add_argument("--interval", type=float, default=SupervisorOptions.interval,
                        help="seconds between looks at the stub processes (default 1)")
    parser.add_argument("--load-timeout", type=float, default=SupervisorOptions.load_timeout)
    parser.add_argument("--reload-attempts", type=int, default=SupervisorOptions.reload_attempts,
                        help="failed reloads of one model before giving up: tritonserver is stopped and the "
                        f"supervisor exits with {GAVE_UP} (default %(default)s)")
    parser.add_argument("--retry-delays", type=_seconds_list, default=SupervisorOptions.retry_delays,
                        metavar="S,S,...", help="seconds between failed reloads, the last repeating (default "
                        + ",".join(f"{d:g}" for d in SupervisorOptions.retry_delays) + ")")
    parser.add_argument("--restarts", type=int, default=SupervisorOptions.restarts,
                        help="start a tritonserver that died on its own again, at most this many times within "
                        "--restart-window seconds (default 0: exit with its status)")
    parser.add_argument("--restart-window", type=float, default=SupervisorOptions.restart_window)
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if args.reload_attempts < 1:
        parser.error("--reload-attempts must be at least 1")
    options = SupervisorOptions(url=http_url(command), headers=restricted_headers(command), interval=args.interval, load_timeout=args.load_timeout,
                                reload_attempts=args.reload_attempts, retry_delays=args.retry_delays,
                                restarts=args.restarts, restart_window=args.restart_window)
    return run(command, options)


if __name__ == "__main__":
    sys.exit(main())
