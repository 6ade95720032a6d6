"""Run the genuine Triton 2.51 server bundled in the `nvidia-pytriton` wheel, without Docker.

`python -m trident_serving.server start|stop|status`. The bundle carries the Python backend only; its stub
must match this interpreter's version, and it finds our virtual environment through PATH.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The header that Triton's restricted model-repository API (index, load, unload) asks for, and the variable that
# holds its value. Over gRPC Triton expects it as `triton-grpc-protocol-<header>` (r24.10
# src/grpc/grpc_server.h kRestrictedProtocolHeaderTemplate); the `trident` client names it alike (trident.calls).
ADMIN_HEADER = "trident-admin-key"
ADMIN_KEY_ENV = "TRIDENT_ADMIN_KEY"
_ADMIN_KEY = re.compile(r"[A-Za-z0-9_.~+/-]+")  # Triton splits the flag at ':' and '=' (ParseGenericConfigOption)


def restricted_api_flags(key: str) -> list[str]:
    """tritonserver flags that make the model-repository API (index, load, unload) over HTTP and gRPC answer only
    requests carrying ADMIN_HEADER: `key`; none for an empty key (the API open to anyone who reaches the ports)."""
    if not key:
        return []
    if not _ADMIN_KEY.fullmatch(key):
        raise ValueError(f"{ADMIN_KEY_ENV} may hold letters, digits and _.~+/- only (Triton's flag syntax)")
    # r24.10 src/command_line_parser.cc: --http-restricted-api / --grpc-restricted-protocol
    # =<category,...>:<header>=<value>
    return [f"--http-restricted-api=model-repository:{ADMIN_HEADER}={key}",
            f"--grpc-restricted-protocol=model-repository:{ADMIN_HEADER}={key}"]


@dataclass(frozen=True)
class GrpcTls:
    """TLS of Triton's gRPC endpoint (Triton 2.51 has none for HTTP): PEM files."""

    server_cert: Path
    server_key: Path
    # The CA that signs client certificates: needed for `mutual`, where a client without one is refused.
    root_cert: Path | None = None
    mutual: bool = False

    def flags(self) -> list[str]:
        """tritonserver's flags (r24.10 src/command_line_parser.cc: --grpc-use-ssl, --grpc-use-ssl-mutual,
        --grpc-server-cert, --grpc-server-key, --grpc-root-cert)."""
        if self.mutual and self.root_cert is None:
            raise ValueError("mutual TLS needs the root certificate that signs the client certificates")
        return ["--grpc-use-ssl=true", *(["--grpc-use-ssl-mutual=true"] if self.mutual else []),
                f"--grpc-server-cert={Path(self.server_cert).resolve()}",
                f"--grpc-server-key={Path(self.server_key).resolve()}",
                *([f"--grpc-root-cert={Path(self.root_cert).resolve()}"] if self.root_cert else [])]


@dataclass
class ServerOptions:
    repository: Path = ROOT / "model_repository"
    run_dir: Path = ROOT / ".run"  # pid file, log and the prepared backend directory
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    ready_timeout: float = 300.0
    # Triton waits this long on stop for idle keep-alive client connections and in-flight requests.
    exit_timeout: int = 5
    # "none": load every model at start; "explicit": load none, clients load/unload models (the perf suite
    # loads a model a second time with a config override, e.g. batching off).
    model_control: str = "none"
    # Triton's rate limiter (README "GPU memory"): executions wait until their instance's rate_limiter
    # resources are free. "off" ignores the configs' rate_limiter blocks.
    rate_limit: str = "execution_count"
    # `<name>:<count>[:<device>]` pools; none given: those of the repository's gpu_plan.json (export plan),
    # else Triton's default (each resource as large as the largest single instance asks for).
    rate_limit_resources: tuple[str, ...] = ()
    # Run tritonserver under trident_serving.supervisor, which reloads a model whose stub process died, and
    # starts tritonserver again when it dies itself, at most `restarts` times in 10 minutes.
    supervise: bool = True
    restarts: int = 3
    # The ports came from free_port() (on_free_ports): when another process binds one of them before tritonserver
    # does, start() picks new free ports (written back here) and starts again. Fixed ports fail instead.
    pick_new_ports: bool = False
    # Models loaded at start with model_control "none" (default: every model of the repository).
    load_models: tuple[str, ...] = ()
    # Non-empty: the model-repository API (index, load, unload) asks for ADMIN_HEADER with this value (see
    # restricted_api_flags); the supervisor reads it from tritonserver's command line.
    admin_key: str = ""
    grpc_tls: GrpcTls | None = None

    @property
    def log_file(self) -> Path:
        return self.run_dir / "tritonserver.log"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "tritonserver.pid"

    @property
    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v2/health/ready"


def free_ports(count: int) -> list[int]:
    """`count` different TCP ports free on loopback now (for servers of tests, benchmarks and simulations).

    Free now only: another process may bind one before the caller's server does (start() handles that)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:  # all bound at once, so the kernel gives each another port
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    """A TCP port free on loopback now."""
    return free_ports(1)[0]


def on_free_ports(**options) -> ServerOptions:
    """ServerOptions whose HTTP, gRPC and metrics ports are free on loopback now (new ones if taken at start)."""
    http, grpc, metrics = free_ports(3)
    return ServerOptions(http_port=http, grpc_port=grpc, metrics_port=metrics, pick_new_ports=True, **options)


def bundle() -> Path:
    """The `pytriton/tritonserver` folder of the installed wheel."""
    import pytriton

    return Path(pytriton.__file__).parent / "tritonserver"


def prepare_backends(run_dir: Path) -> Path:
    """A backend directory whose Python backend has the stub built for this interpreter."""
    source = bundle()
    backends = run_dir / "backends"
    python = backends / "python"
    if python.exists():
        shutil.rmtree(python)
    shutil.copytree(source / "backends" / "python", python, ignore=shutil.ignore_patterns("__pycache__"))
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = source / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise SystemExit(f"nvidia-pytriton has no Python backend stub for Python {version}")
    shutil.copy(stub, python / "triton_python_backend_stub")
    return backends


def server_env() -> dict[str, str]:
    """Environment for tritonserver and the stubs it starts."""
    env = dict(os.environ)
    libs = [str(bundle().parent.parent / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR") or ""]
    env["LD_LIBRARY_PATH"] = ":".join(p for p in libs + [env.get("LD_LIBRARY_PATH", "")] if p)
    # The stub's embedded interpreter locates its prefix from the first `python3` on PATH: our venv.
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.setdefault("PYTHONIOENCODING", "utf-8")  # ultralytics logs emoji
    env.setdefault("YOLO_OFFLINE", "1")
    # OpenCV reads its decoder pixel limit once, at import: set it before any stub imports cv2.
    env.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", "100000000")  # = trident_serving.images.MAX_PIXELS
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # GPU budgets fragment less
    return env


def is_ready(options: ServerOptions) -> bool:
    try:
        with urllib.request.urlopen(options.ready_url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def running_pid(options: ServerOptions) -> int | None:
    """PID from the pid file if that process is alive."""
    try:
        pid = int(options.pid_file.read_text())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def rate_limit_resources(options: ServerOptions) -> tuple[str, ...]:
    """The rate limiter's pools: given ones, else those `python -m export plan` wrote for the repository."""
    if options.rate_limit_resources:
        return tuple(options.rate_limit_resources)
    plan = Path(options.repository) / "gpu_plan.json"
    if not plan.is_file():
        return ()
    prefix = "--rate-limit-resource="
    return tuple(f[len(prefix):] for f in json.loads(plan.read_text()).get("rate_limit_flags", [])
                 if f.startswith(prefix))


# Starts of one start() call when ports picked by free_port() turn out to be taken by then.
PORT_ATTEMPTS = 3
# tritonserver's last words when a port is taken (main.cc), e.g. "failed to start GRPC service: Unavailable -
# Socket '0.0.0.0:8001' already in use". It binds its ports only after loading every model, then exits.
_PORT_TAKEN = re.compile(r"failed to start (\w+) service: .*Socket '[^']*:(\d+)' already in use")


class PortTaken(Exception):
    """tritonserver found one of its ports bound by another process."""

    def __init__(self, service: str, port: int):
        super().__init__(f"the {service} port {port}")
        self.service = service  # as tritonserver names it: GRPC, HTTP, Metrics


def start(options: ServerOptions) -> int:
    """Start the server in the background and wait until it is ready; returns its PID.

    A port another process holds makes tritonserver exit (after loading the models). With
    `options.pick_new_ports` start() then picks new free ports, writes them into `options` and starts again, at
    most PORT_ATTEMPTS times in all; with fixed ports it fails, naming the port.
    """
    if running_pid(options):
        raise SystemExit(f"a server started from {options.run_dir} is already running (make stop first)")
    options.run_dir.mkdir(parents=True, exist_ok=True)
    backends = prepare_backends(options.run_dir)
    attempt = 0
    while True:
        attempt += 1
        try:
            return _start_once(options, backends, keep_log=attempt > 1)
        except PortTaken as taken:
            if not options.pick_new_ports:
                raise SystemExit(f"tritonserver could not listen on {taken}: another process uses it (stop that, "
                                 f"or choose another port with --{taken.service.lower()}-port)") from None
            if attempt == PORT_ATTEMPTS:
                raise SystemExit(f"tritonserver could not listen on {taken}: a port picked free was taken "
                                 f"before tritonserver bound it, at each of {attempt} starts") from None
            print(f"{taken} was taken before tritonserver bound it: starting again on new free ports",
                  file=sys.stderr)
            options.http_port, options.grpc_port, options.metrics_port = free_ports(3)


def _start_once(options: ServerOptions, backends: Path, keep_log: bool) -> int:
    """Start tritonserver and wait until it is ready on all its ports; returns its PID. Raises PortTaken (after
    stopping it) when a port was taken. `keep_log`: append to the log of the previous attempt."""
    command = [
        str(bundle() / "bin" / "tritonserver"),
        f"--model-repository={Path(options.repository).resolve()}",
        f"--backend-directory={backends}",
        f"--cache-directory={bundle() / 'caches'}",
        f"--http-port={options.http_port}", f"--grpc-port={options.grpc_port}",
        f"--metrics-port={options.metrics_port}",
        # p50/p90/p95/p99/p999 latency summaries (nv_inference_*_summary_us) for the dashboard and `trident stats`
        "--metrics-config=summary_latencies=true",
        # 64 MB request/response shared memory per stub: enough for a batch of 10 MP images.
        "--backend-config=python,shm-default-byte-size=67108864",
        "--backend-config=python,shm-growth-byte-size=67108864",
        f"--exit-timeout-secs={options.exit_timeout}",
        "--log-verbose=0",
        # "none" runs as explicit mode with every model loaded at start (what "none" serves), so that the
        # supervisor can reload a model whose stub died.
        *(("--model-control-mode=explicit", *(f"--load-model={m}" for m in options.load_models or ("*",)))
          if options.model_control == "none" else (f"--model-control-mode={options.model_control}",)),
        f"--rate-limit={options.rate_limit}",
        *(f"--rate-limit-resource={r}" for r in rate_limit_resources(options)),
        *restricted_api_flags(options.admin_key),
        *(options.grpc_tls.flags() if options.grpc_tls else ()),
    ]
    if options.supervise:
        command = [sys.executable, "-m", "trident_serving.supervisor", f"--restarts={options.restarts}", "--",
                   *command]
    with open(options.log_file, "ab" if keep_log else "wb") as log:
        log_start = log.tell()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=server_env(),
                                   start_new_session=True)
    options.pid_file.write_text(str(process.pid))
    ports = {options.http_port, options.grpc_port, options.metrics_port}
    deadline = time.monotonic() + options.ready_timeout
    while time.monotonic() < deadline:
        with open(options.log_file, "rb") as log:
            log.seek(log_start)
            taken = _PORT_TAKEN.search(log.read().decode(errors="replace"))
        if taken:
            stop(options)  # the supervisor would start it again on the same ports
            raise PortTaken(taken[1], int(taken[2]))
        # A ready answer alone may come from another server on our HTTP port, or precede the failure to bind
        # the metrics port (bound last): ready only once our processes listen on all three.
        if is_ready(options) and ports <= listening_ports(process.pid):
            return process.pid
        if process.poll() is not None:
            break
        time.sleep(0.5)
    stop(options)
    tail = options.log_file.read_text(errors="replace").splitlines()[-30:]
    raise SystemExit("tritonserver did not become ready; last log lines:\n" + "\n".join(tail))


def listening_ports(pgid: int) -> set[int]:
    """The TCP ports on which processes of the process group `pgid` listen (Linux /proc)."""
    listening = {}  # socket inode -> port
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        try:
            rows = table.read_text().splitlines()[1:]
        except OSError:  # no IPv6
            continue
        for row in rows:
            fields = row.split()  # sl local_address rem_address st ... inode
            if fields[3] == "0A":  # TCP_LISTEN
                listening[fields[9]] = int(fields[1].rsplit(":", 1)[1], 16)
    ports = set()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            for fd in (entry / "fd").iterdir():
                link = os.readlink(fd)  # "socket:[<inode>]" for a socket
                if link.startswith("socket:[") and link[8:-1] in listening:
                    ports.add(listening[link[8:-1]])
        except OSError:  # exited meanwhile
            continue
    return ports


def stop(options: ServerOptions, timeout: float = 30.0) -> bool:
    """Stop the server recorded in the pid file (SIGTERM, then SIGKILL); returns whether one was running."""
    pid = running_pid(options)
    started = options.pid_file.stat().st_mtime if options.pid_file.exists() else time.time()
    options.pid_file.unlink(missing_ok=True)
    if pid is None:
        return False
    os.killpg(pid, signal.SIGTERM)  # its own session: the stubs go with it
    if not _wait(lambda: not _alive(pid), timeout):
        os.killpg(pid, signal.SIGKILL)
        _wait(lambda: not _alive(pid), 10.0)
    _wait(lambda: not _group_alive(pid), 10.0)  # the stubs exit after the server
    remove_stale_shared_memory(since=started)
    return True


def _wait(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except OSError:
        return False


SHM_REGIONS = Path("/dev/shm")
SHM_PREFIX = "triton_python_backend_shm_region_"


def remove_stale_shared_memory(since: float) -> list[str]:
    """Delete the Python backend's shared-memory regions that no process maps any more, among ours created
    after `since`; returns their names.

    Triton unlinks a stub's region when it unloads the model normally, but not when the stub or the server was
    killed (the OOM killer, a crash, the supervisor's repair): each such region stays in /dev/shm, i.e. in RAM
    (64 MiB to 320 MiB each), until reboot.
    """
    candidates = [p for p in SHM_REGIONS.glob(SHM_PREFIX + "*") if _owned_since(p, since)]
    if not candidates:
        return []
    mapped = mapped_shared_memory()
    removed = []
    for path in candidates:
        if path.name[len(SHM_PREFIX):] not in mapped:
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def mapped_shared_memory(pid: int | None = None) -> set[str]:
    """Names (after the prefix) of the Python backend regions mapped by `pid`, or by any readable process."""
    names = set()
    for maps in [Path(f"/proc/{pid}/maps")] if pid else Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # gone, or another user's process (whose regions are not ours to delete anyway)
            continue
        names.update(line.split(SHM_PREFIX, 1)[1].split()[0] for line in text.splitlines() if SHM_PREFIX in line)
    return names


def _owned_since(path: Path, since: float) -> bool:
    try:
        info = path.stat()
    except OSError:
        return False
    return info.st_uid == os.getuid() and info.st_ctime >= since - 1


def _alive(pid: int) -> bool:
    """Whether `pid` still runs; reaps it when it is our own child (a zombie would look alive)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass  # started by another process (make serve): only signal 0 can tell
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def grpc_tls(cert: Path | None, key: Path | None, root: Path | None, mutual: bool) -> GrpcTls | None:
    """The GrpcTls of the command-line options; None without a certificate (plain-text gRPC)."""
    if cert is None and key is None:
        if root or mutual:
            raise ValueError("--grpc-root-cert and --grpc-mutual-tls need --grpc-server-cert and --grpc-server-key")
        return None
    if cert is None or key is None:
        raise ValueError("give both --grpc-server-cert and --grpc-server-key")
    tls = GrpcTls(cert, key, root, mutual)
    tls.flags()  # refuses mutual TLS without a root certificate now, not at start
    return tls


def admin_key(restrict: bool) -> str:
    """The restricted API's key from the environment when `restrict`, else "" (open)."""
    if not restrict:
        return ""
    key = os.environ.get(ADMIN_KEY_ENV, "")
    if not key:
        raise ValueError(f"--restrict-model-repository needs the key in ${ADMIN_KEY_ENV}")
    restricted_api_flags(key)  # refuses a key Triton's flag syntax cannot carry
    return key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trident_serving.server", description=__doc__)
    parser.add_argument("action", choices=("start", "stop", "status"))
    defaults = ServerOptions()
    parser.add_argument("--repository", type=Path, default=defaults.repository)
    parser.add_argument("--run-dir", type=Path, default=defaults.run_dir)
    parser.add_argument("--http-port", type=int, default=defaults.http_port)
    parser.add_argument("--grpc-port", type=int, default=defaults.grpc_port)
    parser.add_argument("--metrics-port", type=int, default=defaults.metrics_port)
    parser.add_argument("--ready-timeout", type=float, default=defaults.ready_timeout)
    parser.add_argument("--exit-timeout", type=int, default=defaults.exit_timeout)
    parser.add_argument("--model-control", choices=("none", "explicit"), default=defaults.model_control,
                        help="explicit: start with no model loaded; clients load them (tritonclient load_model)")
    parser.add_argument("--rate-limit", choices=("execution_count", "off"), default=defaults.rate_limit,
                        help="Triton's rate limiter (default execution_count)")
    parser.add_argument("--rate-limit-resource", dest="rate_limit_resources", action="append", default=[],
                        metavar="NAME:COUNT[:DEVICE]",
                        help="a rate-limiter pool (repeatable); default: the repository's gpu_plan.json")
    parser.add_argument("--restrict-model-repository", action="store_true",
                        help=f"the model-repository API (index, load, unload) answers only requests with the header "
                        f"{ADMIN_HEADER}: ${ADMIN_KEY_ENV} (which must be set); default: open, as Triton is")
    tls = parser.add_argument_group("gRPC TLS (PEM files; Triton 2.51 has no TLS for HTTP)")
    tls.add_argument("--grpc-server-cert", type=Path, help="server certificate: turns TLS on")
    tls.add_argument("--grpc-server-key", type=Path, help="its private key")
    tls.add_argument("--grpc-root-cert", type=Path, help="CA certificate of the client certificates")
    tls.add_argument("--grpc-mutual-tls", action="store_true", help="refuse clients without a certificate")
    args = vars(parser.parse_args(argv))
    try:
        args["grpc_tls"] = grpc_tls(args.pop("grpc_server_cert"), args.pop("grpc_server_key"),
                                    args.pop("grpc_root_cert"), args.pop("grpc_mutual_tls"))
        args["admin_key"] = admin_key(args.pop("restrict_model_repository"))
    except ValueError as exc:
        parser.error(str(exc))
    args["rate_limit_resources"] = tuple(args["rate_limit_resources"])
    options = ServerOptions(**{k: v for k, v in args.items() if k != "action"})
    if args["action"] == "start":
        pid = start(options)
        print(f"tritonserver ready (pid {pid}) on HTTP :{options.http_port}, gRPC :{options.grpc_port}, "
              f"metrics :{options.metrics_port}; log: {options.log_file}")
    elif args["action"] == "stop":
        print("tritonserver stopped" if stop(options) else "no tritonserver running")
    else:
        pid = running_pid(options)
        state = "ready" if is_ready(options) else "not ready"
        print(f"tritonserver pid {pid}: {state}" if pid else "no tritonserver running")
        return 0 if pid else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
