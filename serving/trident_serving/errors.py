"""Error type shared by all models: a problem with the caller's input, reported as INVALID_ARG."""


class InvalidInput(ValueError):
    """The request is malformed; the message names the input and the problem."""
