"""Trident's REST gateway: FastAPI in front of Triton, through one shared `trident.aio.Client` (gRPC).

    python -m trident_gateway serve --triton localhost:8001 --keys keys.json
    python -m trident_gateway keys create NAME
"""
from .app import create_app
from .config import Settings

__all__ = ["create_app", "Settings"]
