"""`trident-serve`: the one tritonserver command line of the serving container (compose and Kubernetes run it).

    trident-serve [--print] [--restarts N] [TRITONSERVER FLAGS...]

execs `python3 -m trident_serving.supervisor [--restarts N] -- tritonserver <flags>`, the flags built here from
environment variables (compose passes `.env`'s values; Kubernetes sets the same names):

    MODEL_REPOSITORY           /models      the repository mount
    CUDA_POOL_BYTES            1073741824   Triton's CUDA memory pool, on every GPU the container sees
    PINNED_POOL_BYTES          536870912    the pinned host memory pool
    RATE_LIMIT_GPU_MEMORY_MIB  65536        the rate limiter's `gpu_memory_mib` pool on each GPU (export plan)
    EXIT_TIMEOUT_SECS          45           how long a stopping Triton waits for in-flight requests
    LOG_VERBOSE                0
    TRIDENT_ADMIN_KEY          (none)       the model-repository API (index, load, unload) answers only requests
                                            with the header trident-admin-key: <this>; none: open (a warning)

Unset or empty means the default. Flags given after `trident-serve` are appended (for a flag that takes one
value, tritonserver keeps the last). `--print` prints the command, one argument per line, and runs nothing.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
from dataclasses import dataclass
from typing import Mapping

from .server import ADMIN_KEY_ENV, restricted_api_flags

CUDA_SUCCESS = 0
CUDA_ERROR_NO_DEVICE = 100


@dataclass(frozen=True)
class Setting:
    default: str
    minimum: int | None  # a whole number of at least this; None: any non-empty text


SETTINGS = {
    "MODEL_REPOSITORY": Setting("/models", None),
    # One BLS call of `detect` at max_batch_size 64 moves a 64x3x640x640 FP32 input (315 MB) and a 64x84x8400
    # output (181 MB) through the CUDA pool (Triton's default is 64 MB): 1 GiB leaves headroom.
    "CUDA_POOL_BYTES": Setting("1073741824", 0),
    "PINNED_POOL_BYTES": Setting("536870912", 0),
    # Unlimited in practice until `python -m export plan` prints the pool for the card (README "GPU memory").
    "RATE_LIMIT_GPU_MEMORY_MIB": Setting("65536", 1),
    # Below the 60 s that compose (stop_grace_period) and Kubernetes (terminationGracePeriodSeconds) wait
    # before they kill the container: in-flight requests finish, then Triton exits on its own.
    "EXIT_TIMEOUT_SECS": Setting("45", 0),
    "LOG_VERBOSE": Setting("0", 0),
}


def settings(environ: Mapping[str, str]) -> dict[str, str]:
    """Each setting's value from `environ` (unset or empty: its default); SystemExit naming a bad one."""
    values = {}
    for name, setting in SETTINGS.items():
        value = environ.get(name, "").strip() or setting.default
        if setting.minimum is not None and not (value.isdigit() and int(value) >= setting.minimum):
            raise SystemExit(f"trident-serve: {name}={value!r} must be a whole number >= {setting.minimum}")
        values[name] = value
    return values


def visible_gpus() -> int:
    """How many CUDA devices this container's processes see, numbered 0..n-1 as tritonserver numbers them.

    Asked of the CUDA driver itself (libcuda's cuDeviceGetCount): the same count, under the same
    CUDA_VISIBLE_DEVICES and MIG rules, that tritonserver gets, where counting /dev/nvidia* nodes or nvidia-smi
    lines would miss MIG instances and CUDA_VISIBLE_DEVICES. It needs no Python package and creates no CUDA
    context (no GPU memory); cuInit takes well under a second. No driver library (no GPU): 0.
    """
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    status = cuda.cuInit(0)
    if status == CUDA_ERROR_NO_DEVICE:
        return 0
    count = ctypes.c_int()
    if status == CUDA_SUCCESS:
        status = cuda.cuDeviceGetCount(ctypes.byref(count))
    if status != CUDA_SUCCESS:
        name = ctypes.c_char_p()
        cuda.cuGetErrorName(status, ctypes.byref(name))
        raise SystemExit(f"trident-serve: the CUDA driver cannot list the GPUs ({(name.value or b'').decode()} = "
                         f"{status}); check the host driver (nvidia-smi) and the container's GPU request")
    return count.value


def tritonserver_flags(values: Mapping[str, str], gpus: int) -> list[str]:
    """tritonserver's flags for validated `values` (see `settings`) on `gpus` GPUs."""
    return [
        f"--model-repository={values['MODEL_REPOSITORY']}",
        # Explicit model control with every model loaded at start: the supervisor can unload and load one model.
        "--model-control-mode=explicit",
        "--load-model=*",
        "--http-port=8000",
        "--grpc-port=8001",
        "--metrics-port=8002",
        # Python backend: a 64 MiB shared-memory region per stub, grown in 64 MiB steps (the defaults are 1 MiB).
        "--backend-config=python,shm-default-byte-size=67108864",
        "--backend-config=python,shm-growth-byte-size=67108864",
        *(f"--cuda-memory-pool-byte-size={gpu}:{values['CUDA_POOL_BYTES']}" for gpu in range(gpus)),
        f"--pinned-memory-pool-byte-size={values['PINNED_POOL_BYTES']}",
        # An execution starts only while the activation memory its instance declares is free (Triton's default
        # is no rate limiting at all, which would ignore the configs' rate_limiter resources).
        "--rate-limit=execution_count",
        f"--rate-limit-resource=gpu_memory_mib:{values['RATE_LIMIT_GPU_MEMORY_MIB']}",
        # p50-p99.9 latency summaries (nv_inference_*_summary_us) for the dashboard and `trident stats`
        "--metrics-config=summary_latencies=true",
        f"--exit-timeout-secs={values['EXIT_TIMEOUT_SECS']}",
        f"--log-verbose={values['LOG_VERBOSE']}",
        "--log-format=ISO8601",
    ]


def command(environ: Mapping[str, str], gpus: int, restarts: int = 0, extra: tuple[str, ...] = ()) -> list[str]:
    """The supervisor running tritonserver: what `trident-serve` execs."""
    supervisor = [sys.executable, "-m", "trident_serving.supervisor"]
    if restarts:
        supervisor.append(f"--restarts={restarts}")
    try:
        restricted = restricted_api_flags(environ.get(ADMIN_KEY_ENV, "").strip())
    except ValueError as exc:
        raise SystemExit(f"trident-serve: {exc}") from None
    return [*supervisor, "--", "tritonserver", *tritonserver_flags(settings(environ), gpus), *restricted, *extra]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trident-serve", allow_abbrev=False,
                                     description=__doc__.split("\n\n")[0],
                                     epilog="Other arguments are appended to tritonserver's flags.")
    parser.add_argument("--print", action="store_true", help="print the command, one argument per line; run nothing")
    parser.add_argument("--restarts", type=int, default=0,
                        help="let the supervisor start a tritonserver that died on its own again, at most N times "
                        "in 10 minutes (default 0: exit, for the container's restart policy)")
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.restarts < 0:
        parser.error(f"--restarts must be 0 or more, got {args.restarts}")
    full = command(os.environ, visible_gpus(), args.restarts, tuple(extra))
    if not os.environ.get(ADMIN_KEY_ENV, "").strip():
        print(f"trident-serve: {ADMIN_KEY_ENV} is not set: anyone who reaches Triton's ports may load and unload "
              "models", file=sys.stderr)
    if args.print:
        print("\n".join(full))
        return 0
    sys.stdout.flush()
    os.execv(full[0], full)  # the supervisor becomes this process: it receives the container's SIGTERM


if __name__ == "__main__":
    sys.exit(main())
