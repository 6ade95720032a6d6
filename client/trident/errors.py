"""Exceptions raised by the client; server messages are kept verbatim."""


class TridentError(Exception):
    """Base class of every error the client raises."""


class InvalidInputError(TridentError, ValueError):
    """The server rejected the request's input (INVALID_ARG / HTTP 400)."""


class ServerUnavailableError(TridentError, ConnectionError):
    """The server could not be reached, is not ready, or did not answer in time."""


class ServerError(TridentError):
    """Any other failure reported by the server."""
