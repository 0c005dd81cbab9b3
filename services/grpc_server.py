"""Starting a gRPC server the way every EFT Serve service does: message limits sized for
logits, grpc.health.v1, and server reflection."""

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024  # batch x positions x vocab x 4 bytes, with room
HEALTH_REFRESH_S = 1.0

log = logging.getLogger(__name__)


def start_grpc_server(
    add_servicers: Callable[[grpc.Server], None],
    service_name: str,
    address: str = "127.0.0.1:0",
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    threads: int = 32,
    credentials: grpc.ServerCredentials | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    health_of: Callable[[], Mapping[str, bool]] | None = None,
    options: Sequence[tuple[str, int]] = (),
    health_changed: threading.Event | None = None,
    max_receive_bytes: int | None = None,
) -> tuple[grpc.Server, int]:
    """A started server; returns it and the bound port (``address`` may ask for port 0).
    ``credentials``: TLS (plaintext without); ``interceptors``: e.g. the bearer-token check.
    ``health_of``: serving or not per health service name, asked every HEALTH_REFRESH_S
    while the server runs (without it, "" and ``service_name`` report SERVING). ``options``:
    more channel arguments (keepalive, connection age). ``health_changed``: set it to have
    health asked again at once (a drain turns NOT_SERVING without waiting for the refresh).
    ``max_receive_bytes``: a smaller limit for requests than for responses."""
    received = max_receive_bytes or max_message_bytes
    options = [("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", received), *options]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=options, interceptors=list(interceptors))
    add_servicers(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([service_name, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_secure_port(address, credentials) if credentials is not None else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    server.start()
    for name in ("", service_name):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if health_of is not None:
        reported = _report(health_servicer, health_of, {})
        threading.Thread(target=_follow_health, args=(server, health_servicer, health_of, health_changed or threading.Event(), reported), name="grpc-health", daemon=True).start()
    return server, port


def _follow_health(server: grpc.Server, servicer: health.HealthServicer, health_of, changed: threading.Event, reported: dict[str, bool]) -> None:
    while changed.wait(HEALTH_REFRESH_S) or server.wait_for_termination(timeout=0):  # True: it timed out, the server still runs
        changed.clear()
        try:
            reported = _report(servicer, health_of, reported)
        except Exception:  # a health report must never kill its thread
            log.exception("health report failed")


def _report(servicer: health.HealthServicer, health_of, reported: Mapping[str, bool]) -> dict[str, bool]:
    """Set the statuses that changed since ``reported`` (a Watch hears each set, so
    unchanged ones are not set again); returns the statuses now."""
    now = health_of()
    for name, serving in now.items():
        if reported.get(name) != serving:
            servicer.set(name, health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING)
    return now
