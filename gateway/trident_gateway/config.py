"""The gateway's settings: command-line options over environment variables over defaults."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

MB = 1024 * 1024
KEYS_ENV = "TRIDENT_GATEWAY_KEYS"


def _env_mb(name: str, default: int) -> int:
    return int(float(os.environ.get(name, default)) * MB)


def _default_data_dir() -> Path:
    # per user: a directory another user made in the shared temp dir would not be writable
    return Path(tempfile.gettempdir()) / f"trident-gateway-{os.getuid()}"


def _jobs_env() -> dict:
    """The analysis jobs' settings given in the environment (TRIDENT_GATEWAY_DATA, _JOBS_DB, _MAX_VIDEO_MB,
    _MAX_JOBS, _JOB_RETENTION_HOURS, _JOB_TIMEOUT)."""
    env = os.environ.get
    found = {"data_dir": Path(env("TRIDENT_GATEWAY_DATA")) if env("TRIDENT_GATEWAY_DATA") else None,
             "jobs_db": Path(env("TRIDENT_GATEWAY_JOBS_DB")) if env("TRIDENT_GATEWAY_JOBS_DB") else None,
             "max_video_bytes": _env_mb("TRIDENT_GATEWAY_MAX_VIDEO_MB", 0) or None,
             "max_jobs": int(env("TRIDENT_GATEWAY_MAX_JOBS", 0)) or None,
             "job_retention": float(env("TRIDENT_GATEWAY_JOB_RETENTION_HOURS", 0)) * 3600 or None,
             "job_timeout": float(env("TRIDENT_GATEWAY_JOB_TIMEOUT", 0)) or None}
    return {name: value for name, value in found.items() if value is not None}


@dataclass
class Settings:
    """What `create_app` needs; `from_env()` reads the TRIDENT_GATEWAY_* variables."""

    triton: str = "localhost:8001"  # gRPC address of Triton
    keys_file: Path | None = None  # required unless auth is False
    auth: bool = True
    cors_origins: list[str] = field(default_factory=list)  # empty: no CORS headers at all
    timeout: float = 120.0  # seconds, each Triton call
    max_image_bytes: int = 20 * MB  # /v1/detect and /v1/ocr request bodies
    max_audio_bytes: int = 100 * MB  # /v1/transcribe request bodies
    body_timeout: float = 60.0  # seconds a request body may send nothing before it is refused (408)
    retry_after: int = 5  # seconds, the Retry-After of 503 answers
    ready_timeout: float = 5.0  # seconds, /readyz waits on Triton
    # gRPC TLS to Triton (PEM files; the client certificate for mutual TLS). /readyz reads Triton's repository
    # index: with a restricted model-repository API it sends `triton_admin_key` (TRIDENT_ADMIN_KEY).
    triton_ssl: bool = False
    triton_root_cert: str | None = None
    triton_client_cert: str | None = None
    triton_client_key: str | None = None
    triton_admin_key: str | None = None  # None: $TRIDENT_ADMIN_KEY (the trident client's default)
    # HTTPS of the gateway itself (uvicorn's ssl_certfile / ssl_keyfile); none: plain HTTP (or TLS at a proxy)
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    # Analysis jobs (/v1/analyze): uploads and results under `data_dir`, their state in SQLite (`jobs_db`). A job
    # lives on the gateway that took it: behind several replicas, one gateway serves the jobs and the others are
    # started with `jobs` off (they answer the job routes 404 naming where they are; TRIDENT_GATEWAY_JOBS=0).
    jobs: bool = True
    data_dir: Path = field(default_factory=_default_data_dir)  # give a persistent volume in production
    jobs_db: Path | None = None  # None: data_dir / "jobs.sqlite3"
    max_video_bytes: int = 2048 * MB  # /v1/analyze request bodies
    max_jobs: int = 2  # jobs run at once; the others wait, queued
    job_retention: float = 24 * 3600.0  # seconds a finished job's files are kept
    sweep_interval: float = 60.0  # seconds between two looks for expired files
    job_timeout: float = 3600.0  # seconds, each Triton call of a job (a whole soundtrack is one request)

    @classmethod
    def from_env(cls) -> "Settings":
        """(An empty variable counts as unset: compose passes `${GATEWAY_SSL_CERTFILE:-}` as "".)"""
        keys = os.environ.get(KEYS_ENV)
        env = os.environ.get
        return cls(triton=env("TRIDENT_GATEWAY_TRITON", cls.triton),
                   keys_file=Path(keys) if keys else None,
                   triton_ssl=env("TRIDENT_GATEWAY_TRITON_SSL", "") not in ("", "0", "false"),
                   triton_root_cert=env("TRIDENT_GATEWAY_TRITON_ROOT_CERT") or None,
                   triton_client_cert=env("TRIDENT_GATEWAY_TRITON_CLIENT_CERT") or None,
                   triton_client_key=env("TRIDENT_GATEWAY_TRITON_CLIENT_KEY") or None,
                   ssl_certfile=env("TRIDENT_GATEWAY_SSL_CERTFILE") or None,
                   ssl_keyfile=env("TRIDENT_GATEWAY_SSL_KEYFILE") or None,
                   timeout=float(os.environ.get("TRIDENT_GATEWAY_TIMEOUT", cls.timeout)),
                   max_image_bytes=_env_mb("TRIDENT_GATEWAY_MAX_IMAGE_MB", 20),
                   max_audio_bytes=_env_mb("TRIDENT_GATEWAY_MAX_AUDIO_MB", 100),
                   body_timeout=float(env("TRIDENT_GATEWAY_BODY_TIMEOUT", "") or cls.body_timeout),
                   jobs=env("TRIDENT_GATEWAY_JOBS", "1").lower() not in ("0", "false", "off", "no"), **_jobs_env())

    def client_options(self) -> dict:
        """The trident client's TLS and admin-key arguments (trident.aio.Client); TLS is implied by any PEM file."""
        ssl = self.triton_ssl or any((self.triton_root_cert, self.triton_client_cert, self.triton_client_key))
        return {"ssl": ssl, "root_certificates": self.triton_root_cert, "private_key": self.triton_client_key,
                "certificate_chain": self.triton_client_cert, "admin_key": self.triton_admin_key}

    def check(self) -> None:
        """Refuse settings that would serve the API open by accident, or half of a TLS setting."""
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("HTTPS needs both --ssl-certfile and --ssl-keyfile")
        if (self.triton_client_cert is None) != (self.triton_client_key is None):
            raise ValueError("a client certificate to Triton needs both --triton-client-cert and --triton-client-key")
        if self.auth and self.keys_file is None:
            raise ValueError(f"no API keys file: give --keys FILE (or {KEYS_ENV}), or --no-auth explicitly")
        if self.auth and not Path(self.keys_file).is_file():
            raise ValueError(f"API keys file {self.keys_file} does not exist: "
                             f"create a key first (python -m trident_gateway keys create NAME --keys FILE)")
