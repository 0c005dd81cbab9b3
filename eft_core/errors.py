"""The project's error types, shared by every layer.

Each type carries a status ``code`` spelled like a ``grpc.StatusCode`` name, so the service
layer maps errors to wire statuses through one table, and an optional ``field``: the path of
the request or config field at fault (``"sampling.top_p"``, ``"deltas[1].weight"``).
"""


class EFTError(Exception):
    """Base class: a failure with a status code and, where one is at fault, a field."""

    code = "UNKNOWN"

    def __init__(self, message: str, *, field: str | None = None):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)


class InvalidArgumentError(EFTError):
    """The caller sent a value that can never be valid (NaN weight, top_p of 2, k < 0)."""

    code = "INVALID_ARGUMENT"


class NotFoundError(EFTError):
    """A named model or composition does not exist."""

    code = "NOT_FOUND"


class ResourceExhaustedError(EFTError):
    """Over a limit: prompt length, max_tokens, KV budget, queue."""

    code = "RESOURCE_EXHAUSTED"


class OverloadedError(ResourceExhaustedError):
    """At capacity now (the queue, a worker's cache budget): the same request may succeed
    later (HTTP 429), unlike one over a limit (HTTP 400)."""


class UnavailableError(EFTError):
    """A part the request depends on (a worker replica) is gone; retrying later may work."""

    code = "UNAVAILABLE"


class DeadlineExceededError(EFTError):
    """The request's deadline passed before it finished."""

    code = "DEADLINE_EXCEEDED"


class InternalError(EFTError):
    """The server's own fault (a part refused what another part sent): never the caller's."""

    code = "INTERNAL"


def require(condition: bool, field: str, message: str) -> None:
    """Raise InvalidArgumentError(message, field=field) unless condition holds."""
    if not condition:
        raise InvalidArgumentError(message, field=field)
