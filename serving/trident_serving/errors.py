"""Error types shared by all models: bad input (INVALID_ARG), unavailable model (UNAVAILABLE), cancelled request."""


class InvalidInput(ValueError):
    """The request is malformed; the message names the input and the problem."""


class Unavailable(RuntimeError):
    """The model cannot take the request now (unloading, or its worker stopped): reported as UNAVAILABLE."""


class Cancelled(RuntimeError):
    """The caller gave up (client timeout or cancellation) before the request was answered."""


def shown(value: str, limit: int = 40) -> str:
    """`value` as an error message quotes it: repr, cut to `limit` characters (requests may carry megabytes)."""
    return repr(value) if len(value) <= limit else f"{value[:limit]!r}… ({len(value)} characters)"
