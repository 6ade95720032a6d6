"""The gateway's settings: command-line options over environment variables over defaults."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

MB = 1024 * 1024
KEYS_ENV = "TRIDENT_GATEWAY_KEYS"


def _env_mb(name: str, default: int) -> int:
    return int(float(os.environ.get(name, default)) * MB)


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
    retry_after: int = 5  # seconds, the Retry-After of 503 answers
    ready_timeout: float = 5.0  # seconds, /readyz waits on Triton

    @classmethod
    def from_env(cls) -> "Settings":
        keys = os.environ.get(KEYS_ENV)
        return cls(triton=os.environ.get("TRIDENT_GATEWAY_TRITON", cls.triton),
                   keys_file=Path(keys) if keys else None,
                   timeout=float(os.environ.get("TRIDENT_GATEWAY_TIMEOUT", cls.timeout)),
                   max_image_bytes=_env_mb("TRIDENT_GATEWAY_MAX_IMAGE_MB", 20),
                   max_audio_bytes=_env_mb("TRIDENT_GATEWAY_MAX_AUDIO_MB", 100))

    def check(self) -> None:
        """Refuse settings that would serve the API open by accident."""
        if self.auth and self.keys_file is None:
            raise ValueError(f"no API keys file: give --keys FILE (or {KEYS_ENV}), or --no-auth explicitly")
        if self.auth and not Path(self.keys_file).is_file():
            raise ValueError(f"API keys file {self.keys_file} does not exist: "
                             f"create a key first (python -m trident_gateway keys create NAME --keys FILE)")
