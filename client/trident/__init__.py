"""Trident client: `Client(url, protocol)` over tritonclient, `trident.aio.Client` for asyncio, and the `trident`
command line."""
from .client import Client
from .errors import InvalidInputError, ServerError, ServerUnavailableError, TridentError
from .results import Detection, DetectResult

__all__ = ["Client", "Detection", "DetectResult", "TridentError", "InvalidInputError", "ServerError",
           "ServerUnavailableError"]
