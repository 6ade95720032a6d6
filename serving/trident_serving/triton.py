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

from .errors import InvalidInput

log = logging.getLogger("trident")


def parameters(args: dict) -> dict[str, str]:
    """The string parameters of the model's config.pbtxt."""
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def device(args: dict) -> str:
    """'cuda:<id>' for a GPU instance when CUDA is usable, else 'cpu'."""
    import torch

    if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available():
        return f"cuda:{args['model_instance_device_id']}"
    return "cpu"


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
    """An error response: INVALID_ARG for bad input, INTERNAL (logged with its traceback) for anything else."""
    if isinstance(exc, InvalidInput):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))
    log.error("unexpected error: %s", "".join(traceback.format_exception(exc)))
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"internal error: {type(exc).__name__}: {exc}"))


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

    A bad request gets its own INVALID_ARG response; a batch that fails fails its own requests, not the server.
    """
    parsed, responses = parse_requests(requests, parse)
    valid = [i for i, item in enumerate(parsed) if item is not None]
    if valid:
        try:
            for i, response in zip(valid, run([parsed[i] for i in valid])):
                responses[i] = response
        except Exception as exc:  # noqa: BLE001 - see the docstring
            for i in valid:
                responses[i] = error_response(exc)
    return responses


def quiet_ultralytics() -> None:
    """Settings ultralytics needs inside a server: no network, writable config dir, UTF-8 logging."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "trident-ultralytics"))
