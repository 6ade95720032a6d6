"""Glue between Triton's Python backend and the plain functions of this package.

Imported only from `model.py` files (it needs `triton_python_backend_utils`, which exists inside the stub).
Every model validates each request on its own, so one bad request fails alone with INVALID_ARG while
the rest of the batch is served.
"""
from __future__ import annotations

import json
import logging
import os
import traceback
from typing import Any, Callable

import numpy as np
import triton_python_backend_utils as pb_utils

from . import gpu, metrics
from .batching import run_in_halves
from .errors import Cancelled, InvalidInput, Unavailable

log = logging.getLogger("trident")


class TritonLogHandler(logging.Handler):
    """Forwards log records to Triton's server log (`pb_utils.Logger`), tagged with the model instance.

    Triton's own prefix names only the calling file and line, which is this handler for every model, so the
    instance name (e.g. `whisper_0_0`) and the record's origin go into the message.
    """

    def __init__(self, instance: str):
        super().__init__()
        self.instance = instance

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = f"{self.instance} {record.module}:{record.lineno}: {self.format(record)}"
            if record.levelno >= logging.ERROR:
                pb_utils.Logger.log_error(message)
            elif record.levelno >= logging.WARNING:
                pb_utils.Logger.log_warn(message)
            elif record.levelno >= logging.INFO:
                pb_utils.Logger.log_info(message)
            else:  # shown with tritonserver --log-verbose=1
                pb_utils.Logger.log_verbose(message)
        except Exception:  # noqa: BLE001 - logging must never fail a request
            self.handleError(record)


def init_instance(args: dict) -> None:
    """Set up this stub process (one model instance): the `trident` logger writes to the server log, and
    error responses are counted in trident_request_errors_total."""
    global _metrics
    log.handlers[:] = [TritonLogHandler(args["model_instance_name"])]
    log.setLevel(logging.DEBUG)  # the server's --log-verbose decides what verbose lines it keeps
    log.propagate = False
    _metrics = metrics.ModelMetrics(args, [metrics.REQUEST_ERRORS])
    for code in ERROR_CODES[:4]:  # the codes our models answer with, at 0 from the start
        _metrics.touch(metrics.REQUEST_ERRORS, code=code)


_metrics: metrics.ModelMetrics | None = None
# Triton error codes by name, for trident_request_errors_total's `code` label
ERROR_CODES = ("INVALID_ARG", "UNAVAILABLE", "CANCELLED", "INTERNAL", "UNSUPPORTED", "NOT_FOUND", "ALREADY_EXISTS",
               "UNKNOWN")


def parameters(args: dict) -> dict[str, str]:
    """The string parameters of the model's config.pbtxt."""
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


# This stub process's one model instance (Triton runs each Python-model instance in its own process).
_placement = gpu.Placement()
_model_name = "model"


def placement(args: dict) -> gpu.Placement:
    """Place this instance: a GPU instance on `model_instance_device_id` (made the current CUDA device, its
    `gpu_memory_mib` budget applied), else the CPU. A GPU instance without usable CUDA fails to load (NoGPU)."""
    global _placement, _model_name
    _model_name = args.get("model_name", _model_name)
    budget = gpu.parse_budget(parameters(args).get("gpu_memory_mib"))
    _placement = gpu.place(args.get("model_instance_kind", "CPU"), args.get("model_instance_device_id", 0),
                           budget, model=args.get("model_instance_name", args.get("model_name", "model")))
    return _placement


def device(args: dict) -> str:
    """'cuda:<id>' for a GPU instance, 'cpu' for a CPU one (see `placement`: no silent CPU fallback)."""
    return placement(args).device


def memory_checkpoint(phase: str) -> None:
    """Record this instance's PyTorch memory counters when TRIDENT_GPU_MEMORY_LOG is set (perf.memory)."""
    gpu.record_memory(_model_name, phase, _placement)


def bytes_input(request, name: str, optional: bool = False) -> bytes | None:
    """The single element of a TYPE_STRING [1] input, as bytes."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        if optional:
            return None
        raise InvalidInput(f"input {name} is missing")
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise InvalidInput(f"input {name} must hold exactly one element per request, got {values.size}: "
                           "send one item per request (the server batches concurrent requests itself)")
    value = values[0]
    return value if isinstance(value, bytes) else str(value).encode()


def text_input(request, name: str, default: str) -> str:
    """An optional TYPE_STRING [1] input decoded as UTF-8 text; absent or empty gives `default`."""
    raw = bytes_input(request, name, optional=True)
    if not raw:
        return default
    try:
        return raw.decode("utf-8").strip() or default
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"input {name} is not valid UTF-8 text") from exc


def scalar_input(request, name: str, default: float) -> float:
    """An optional numeric [1] input as a Python float."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise InvalidInput(f"input {name} must hold exactly one value, got {values.size}")
    return float(values[0])


def string_tensor(name: str, values: list[str | bytes], shape: tuple[int, ...] | None = None) -> Any:
    """A TYPE_STRING output tensor; `shape` defaults to a 1-D list."""
    array = np.array([v.encode("utf-8") if isinstance(v, str) else v for v in values], dtype=np.object_)
    return pb_utils.Tensor(name, array.reshape(shape if shape is not None else (len(values),)))


def error_response(exc: BaseException):
    """The error response for `exc` (see `_error_response`), counted by its code in trident_request_errors_total:
    Triton's own failure counter sees a Python model's error responses as successful requests."""
    response = _error_response(exc)
    if _metrics is not None:
        code = response.error().code()
        names = [n for n in ERROR_CODES if getattr(pb_utils.TritonError, n, None) == code]
        _metrics.inc(metrics.REQUEST_ERRORS, code=names[0] if names else str(code))
    return response


# gRPC carries the error message in a header: beyond its 8 KiB metadata limit the client gets "Stream removed"
# instead of the error (found by `make fuzz`: a 10,000-character LANGUAGE echoed back).
MAX_MESSAGE = 1000


def _short(message: str) -> str:
    if len(message) <= MAX_MESSAGE:
        return message
    return f"{message[:MAX_MESSAGE]}… ({len(message) - MAX_MESSAGE} more characters)"


def _error_response(exc: BaseException):
    """An error response: INVALID_ARG for bad input, INTERNAL (logged with its traceback) for anything else."""
    message, code = _error(exc)
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(_short(message), code))


def _error(exc: BaseException) -> tuple[str, int]:
    """The message and Triton error code `exc` is answered with."""
    if isinstance(exc, InvalidInput):
        return str(exc), pb_utils.TritonError.INVALID_ARG
    if isinstance(exc, (Unavailable, Cancelled)):
        return str(exc), (pb_utils.TritonError.CANCELLED if isinstance(exc, Cancelled)
                          else pb_utils.TritonError.UNAVAILABLE)
    budget = gpu.budget_error(exc, _placement)  # CUDA out of memory: the batch fails, the instance lives on
    if budget is not None:
        log.warning("%s", budget)
        return str(budget), pb_utils.TritonError.UNAVAILABLE
    log.error("unexpected error: %s", "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return f"internal error: {type(exc).__name__}: {exc}", pb_utils.TritonError.INTERNAL


def parse_requests(requests: list, parse: Callable[[Any], Any]) -> tuple[list, list]:
    """Apply `parse` to each request; returns (parsed or None, error response or None) per request."""
    parsed, errors = [], []
    for request in requests:
        try:
            parsed.append(parse(request))
            errors.append(None)
        except Exception as exc:  # noqa: BLE001 - every failure becomes that request's error response
            parsed.append(None)
            errors.append(error_response(exc))
    return parsed, errors


def serve_batch(requests: list, parse: Callable[[Any], Any], run: Callable[[list], list]) -> list:
    """Parse each request alone, then `run` the valid ones as one batch (parsed items in, responses out).

    A bad request gets its own INVALID_ARG response; a batch that fails is retried in halves, so only the
    requests that fail alone get an error (see batching.run_in_halves), and never the server.
    """
    parsed, responses = parse_requests(requests, parse)
    valid = [i for i, item in enumerate(parsed) if item is not None]
    if valid:
        memory_checkpoint("loaded")  # the first one: weights and buffers, before any request's activations
        # A batch that raises is retried in halves, so one item that breaks it fails alone.
        for i, response in zip(valid, run_in_halves([parsed[i] for i in valid], run)):
            responses[i] = error_response(response) if isinstance(response, Exception) else response
        memory_checkpoint(f"batch{len(valid)}")
    return responses


def quiet_ultralytics() -> None:
    """Settings ultralytics needs inside a server: no network, writable config dir, UTF-8 logging."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "trident-ultralytics"))
