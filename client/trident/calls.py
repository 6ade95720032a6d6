"""What each Trident call sends and how its answer is read, shared by `trident.Client` and `trident.aio.Client`.

A client method builds a `Call` (model, input arrays, output names, parser), sends it the way its client sends
(blocking or awaited, gRPC or HTTP) and returns `call.parse(outputs)`; so both clients send the same requests
and return the same results. Also here: the URL forms both accept and the translation of tritonclient's errors.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Sequence, TypeVar

import numpy as np

from .balancing import channel_args, is_resolver_target
from .errors import InvalidInputError, ServerError, ServerUnavailableError, TridentError
from .inputs import ImageLike, encode_image, read_bytes
from .results import Detection, DetectResult, Segment, TextLine, Transcription

DEFAULT_PORTS = {"grpc": 8001, "http": 8000}
# The header a restricted model-repository API (index, load, unload) asks for, and the variable holding its value:
# the server's `--restrict-model-repository` (trident_serving.server.ADMIN_HEADER; this package imports nothing of
# the server). Triton reads the gRPC one as `triton-grpc-protocol-<header>` (its restricted-protocol prefix).
ADMIN_HEADER = "trident-admin-key"
ADMIN_KEY_ENV = "TRIDENT_ADMIN_KEY"
GRPC_RESTRICTED_PREFIX = "triton-grpc-protocol-"
Result = TypeVar("Result")


# -- where to send ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tls:
    """TLS of a gRPC channel, as tritonclient.grpc takes it: PEM file paths. `root_certificates`: the CA that
    signed the server's certificate (None: gRPC's default roots); `private_key` + `certificate_chain`: the client's
    own certificate, for a server that asks for one (mutual TLS)."""

    root_certificates: str | None = None
    private_key: str | None = None
    certificate_chain: str | None = None

    def __post_init__(self):
        if (self.private_key is None) != (self.certificate_chain is None):
            raise ValueError("a client certificate needs both its private key and its certificate chain")

    def options(self) -> dict:
        """tritonclient.grpc's (and .aio's) InferenceServerClient arguments."""
        return {"ssl": True, "root_certificates": self.root_certificates, "private_key": self.private_key,
                "certificate_chain": self.certificate_chain}


@dataclass(frozen=True)
class Endpoint:
    """A server address as tritonclient takes it ("host:port" or a gRPC resolver target), its protocol, the
    gRPC channel arguments it needs (None: tritonclient's defaults), its TLS (None: plain text) and the headers of
    its model-repository calls (a restricted API's key)."""

    address: str
    protocol: str
    channel_args: list | None = None
    tls: Tls | None = None
    admin_headers: dict = field(default_factory=dict)

    def client_options(self) -> dict:
        """tritonclient.grpc's InferenceServerClient arguments beyond the address ({} for HTTP)."""
        if self.protocol != "grpc":
            return {}
        return {"channel_args": self.channel_args, **(self.tls.options() if self.tls else {})}


def endpoint(url: str, protocol: str | None = None, tls: Tls | None = None,
             admin_key: str | None = None) -> Endpoint:
    """Parse "host[:port]", "http://host[:port]", "grpc://host[:port]" or a gRPC name-resolver target
    ("dns:///host:8001", "ipv4:a:8001,b:8001", balanced over every replica: `trident.balancing`).
    Without a port the protocol's default (gRPC 8001, HTTP 8000) is used. `tls`: gRPC only (Triton serves HTTP
    in plain text). `admin_key`: see `admin_headers`."""
    if is_resolver_target(url):
        if (protocol or "grpc").lower() != "grpc":
            raise ValueError(f"{url!r} is a gRPC name-resolver target: protocol must be 'grpc'")
        return Endpoint(url, "grpc", channel_args(), tls, admin_headers("grpc", admin_key))
    scheme, _, address = url.rpartition("://")
    protocol = (protocol or scheme or "grpc").lower()
    if protocol not in DEFAULT_PORTS:
        raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
    if tls is not None and protocol != "grpc":
        raise ValueError("TLS is for gRPC: Triton serves HTTP in plain text")
    if ":" not in address:
        address = f"{address}:{DEFAULT_PORTS[protocol]}"
    return Endpoint(address, protocol, None, tls, admin_headers(protocol, admin_key))


def admin_headers(protocol: str, key: str | None = None) -> dict[str, str]:
    """The headers a restricted model-repository API asks for, for tritonclient's `headers=` of `protocol`;
    `key` None: $TRIDENT_ADMIN_KEY; no key: {} (an open API needs none)."""
    key = os.environ.get(ADMIN_KEY_ENV, "") if key is None else key
    if not key:
        return {}
    return {(GRPC_RESTRICTED_PREFIX if protocol == "grpc" else "") + ADMIN_HEADER: key}


# -- what to send ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Call(Generic[Result]):
    """One inference request: `inputs` already carry the batch axis; `parse` turns the `outputs` into a result."""

    model: str
    inputs: dict[str, np.ndarray]
    outputs: tuple[str, ...]
    parse: Callable[[dict[str, np.ndarray]], Result]


def detect(image: ImageLike, conf: float | None = None, iou: float | None = None) -> Call[DetectResult]:
    """`Client.detect`'s request."""
    inputs = {"IMAGE": _bytes_tensor(encode_image(image))}
    if conf is not None:
        inputs["CONF_THRESHOLD"] = np.array([[conf]], dtype=np.float32)
    if iou is not None:
        inputs["IOU_THRESHOLD"] = np.array([[iou]], dtype=np.float32)
    return Call("detect", inputs, ("BOXES", "SCORES", "CLASSES", "LABELS"), _detections)


def _detections(out: dict[str, np.ndarray]) -> DetectResult:
    labels = [label.decode("utf-8") for label in out["LABELS"][0]]
    return DetectResult([
        Detection(tuple(float(v) for v in box), float(score), int(cls), label)
        for box, score, cls, label in zip(out["BOXES"][0], out["SCORES"][0], out["CLASSES"][0], labels)
    ])


def transcribe(audio: str | bytes | np.ndarray, language: str | None = None, task: str = "transcribe",
               temperature: float | Sequence[float] | None = None,
               word_timestamps: bool = False) -> Call[Transcription]:
    """`Client.transcribe`'s request (same arguments)."""
    if isinstance(audio, np.ndarray):
        inputs = {"PCM": np.asarray(audio, dtype=np.float32).reshape(1, -1)}
    else:
        inputs = {"AUDIO": _bytes_tensor(read_bytes(audio))}
    if language:
        inputs["LANGUAGE"] = _bytes_tensor(language.encode())
    inputs["TASK"] = _bytes_tensor(task.encode())
    if temperature is not None:
        inputs["TEMPERATURE"] = np.array(temperature, dtype=np.float32).reshape(1, -1)
    if word_timestamps:
        inputs["WORD_TIMESTAMPS"] = np.array([[True]])
    return Call("whisper", inputs, ("TEXT", "LANGUAGE", "SEGMENTS"), _transcription)


def _transcription(out: dict[str, np.ndarray]) -> Transcription:
    return Transcription(text=out["TEXT"].reshape(-1)[0].decode("utf-8"),
                         language=out["LANGUAGE"].reshape(-1)[0].decode("utf-8"),
                         segments=[Segment.from_dict(s) for s in json.loads(out["SEGMENTS"].reshape(-1)[0])])


def read_text(image: ImageLike) -> Call[list[TextLine]]:
    """`Client.read_text`'s request."""
    return Call("easyocr", {"IMAGE": _bytes_tensor(encode_image(image))}, ("BOXES", "TEXTS", "SCORES"), _text_lines)


def _text_lines(out: dict[str, np.ndarray]) -> list[TextLine]:
    return [TextLine([(float(x), float(y)) for x, y in box], text.decode("utf-8"), float(score))
            for box, text, score in zip(out["BOXES"][0], out["TEXTS"][0], out["SCORES"][0])]


def _bytes_tensor(value: bytes) -> np.ndarray:
    """A [1, 1] BYTES tensor: one element of a batch of one."""
    return np.array([[value]], dtype=np.object_)


# -- how tritonclient sends it ---------------------------------------------------------------------------------

_TRITON_DTYPES = {"f4": "FP32", "f2": "FP16", "f8": "FP64", "i4": "INT32", "i8": "INT64", "u1": "UINT8",
                  "i1": "INT8", "b1": "BOOL"}


def infer_inputs(module: Any, inputs: dict[str, np.ndarray]) -> list:
    """`inputs` as `module.InferInput`s (`module`: tritonclient.grpc or tritonclient.http, or their aio)."""
    tensors = []
    for name, array in inputs.items():
        datatype = "BYTES" if array.dtype == np.object_ else _TRITON_DTYPES[array.dtype.str.lstrip("<>|=")]
        tensor = module.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def health_report(where: Endpoint, live: bool, ready: bool, index: Any) -> dict:
    """`Client.health()`'s answer from the server's liveness, readiness and repository index (gRPC's message
    or HTTP's JSON list): the state and the version of each model."""
    if where.protocol == "grpc":
        index = [{"name": m.name, "version": m.version, "state": m.state} for m in index.models]
    return {"url": where.address, "protocol": where.protocol, "live": live, "ready": ready,
            "models": {m["name"]: m.get("state", "") for m in index},
            "versions": {m["name"]: m.get("version", "") for m in index}}


def translate(exc: Exception, what: str, connection_errors: tuple[type[BaseException], ...] = ()) -> TridentError:
    """tritonclient's exception (or a socket error, or one of `connection_errors`) as one of ours, with the
    server's message."""
    status = getattr(exc, "status", "")  # tritonclient's errors: a method giving gRPC's code or HTTP's status
    status = str((status() if callable(status) else status) or "")
    message = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
    if "INVALID_ARGUMENT" in status or status == "400":
        return InvalidInputError(f"{what}: {message}")
    if any(s in status for s in ("UNAVAILABLE", "DEADLINE_EXCEEDED")) \
            or isinstance(exc, (OSError, TimeoutError, *connection_errors)):
        return ServerUnavailableError(f"{what}: {message or type(exc).__name__}")
    return ServerError(f"{what}: {message or exc}")
