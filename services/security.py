"""Transport security of the public ports: TLS from PEM files, and a bearer token that every
call must carry (``authorization: Bearer <token>``, compared in constant time).

The gRPC health service stays open (Kubernetes probes send no token); so do ``/health``,
``/-/healthz`` (KubeRay's check) on HTTP. The scrape port has neither TLS nor token: keep
it inside the cluster (the chart's NetworkPolicy does).
"""

import hmac
from dataclasses import dataclass
from pathlib import Path

import grpc

OPEN_GRPC_METHODS = ("/grpc.health.v1.Health/",)
HEALTHZ_PATH = "/-/healthz"  # Ray Serve's proxy health path, which KubeRay polls
DRAIN_PATH = "/-/drain"  # on the scrape port, from loopback only: `eft drain` in the pod
OPEN_HTTP_PATHS = ("/health", HEALTHZ_PATH)  # /metrics on the public port needs the token: the scrape port serves it open


@dataclass(frozen=True)
class Security:
    """What the public ports require; the defaults require nothing."""

    cert_chain: bytes | None = None  # PEM: the server certificate (and intermediates)
    private_key: bytes | None = None  # PEM
    token: str | None = None

    @classmethod
    def from_files(cls, cert_file: str | None = None, key_file: str | None = None, token_file: str | None = None) -> "Security":
        """Read the files now: a missing or empty one fails at start, naming it."""
        cert, key = (_read(cert_file, "tls.cert_file"), _read(key_file, "tls.key_file")) if cert_file or key_file else (None, None)
        token = _read(token_file, "auth_token_file").decode().strip() if token_file else None
        if token_file and not token:
            raise ValueError(f"auth_token_file {token_file}: is empty")
        return cls(cert, key, token)

    @property
    def tls(self) -> bool:
        return self.cert_chain is not None

    def grpc_credentials(self) -> grpc.ServerCredentials | None:
        return grpc.ssl_server_credentials([(self.private_key, self.cert_chain)]) if self.tls else None

    def grpc_interceptors(self) -> list[grpc.ServerInterceptor]:
        return [BearerTokenInterceptor(self.token)] if self.token else []

    def authorized(self, header: str | None) -> bool:
        """Whether an ``authorization`` header value carries the token (True when none is required)."""
        if self.token is None:
            return True
        scheme, _, presented = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), self.token.encode())


def _read(path: str | None, field: str) -> bytes:
    if not path:
        raise ValueError(f"{field}: missing (TLS needs both cert_file and key_file)")
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"{field}: cannot read {path}: {error.strerror}") from None


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Refuses calls without the token with UNAUTHENTICATED, before any handler runs."""

    def __init__(self, token: str):
        self.security = Security(token=token)

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(OPEN_GRPC_METHODS):
            return continuation(handler_call_details)
        header = dict(handler_call_details.invocation_metadata or ()).get("authorization")
        if self.security.authorized(header):
            return continuation(handler_call_details)
        message = "missing bearer token (metadata authorization: Bearer <token>)" if header is None else "invalid bearer token"
        return _refusal(continuation(handler_call_details), message)


def _refusal(handler, message: str):
    """A handler of the same kind as ``handler`` that aborts with UNAUTHENTICATED."""

    def abort(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    def abort_stream(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # never reached: makes this a generator for streaming responses

    if handler is None:
        return None
    if handler.response_streaming:
        make = grpc.stream_stream_rpc_method_handler if handler.request_streaming else grpc.unary_stream_rpc_method_handler
        return make(abort_stream, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    make = grpc.stream_unary_rpc_method_handler if handler.request_streaming else grpc.unary_unary_rpc_method_handler
    return make(abort, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
