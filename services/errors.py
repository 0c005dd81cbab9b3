"""One table from the project's error types to gRPC status codes, and the servicer decorator
that applies it. A client's mistake is never INTERNAL; only a genuine bug is."""

import functools
import logging

import grpc

from eft_core import DeadlineExceededError, EFTError, InternalError, InvalidArgumentError, NotFoundError, ResourceExhaustedError, UnavailableError

log = logging.getLogger(__name__)

STATUS_OF = {
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    InternalError: grpc.StatusCode.INTERNAL,
}
ERROR_OF = {status: error for error, status in STATUS_OF.items()}


def status_of(error: EFTError) -> grpc.StatusCode:
    return next((status for kind, status in STATUS_OF.items() if isinstance(error, kind)), grpc.StatusCode.UNKNOWN)


def aborts_on_errors(method):
    """Servicer method decorator: EFTError -> its status with the message; anything else ->
    INTERNAL, logged with its traceback."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except EFTError as error:
            context.abort(status_of(error), str(error))
        except Exception:
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__} failed on the server; see its log")

    return wrapper


def status_number(error: EFTError) -> int:
    """The error's status as the integer a message field carries (a per-item error)."""
    return status_of(error).value[0]


def error_from_status(number: int, message: str) -> EFTError:
    """The error a status number and message (a per-item error) stand for."""
    status = next((s for s in grpc.StatusCode if s.value[0] == number), grpc.StatusCode.UNKNOWN)
    return ERROR_OF.get(status, EFTError)(message)


def error_from_rpc(error: grpc.RpcError) -> EFTError:
    """The project error a failed call stands for, on the client side."""
    kind = ERROR_OF.get(error.code(), UnavailableError if error.code() == grpc.StatusCode.CANCELLED else EFTError)
    return kind(f"{error.code().name}: {error.details()}")
