"""What the public servers allow one connection: slow or idle clients are cut off, and the
number of HTTP connections is capped, so no client can hold the gateway's process (which
also holds the coordinator's worker channels) by being slow.

- HTTP (uvicorn): a request's headers must arrive within ``header_timeout_s`` of its first
  byte (or of the connection's start); its body within ``body_timeout_s`` (408); an idle
  keep-alive connection closes after ``keep_alive_s``; beyond ``max_connections`` open
  connections, new requests get 503.
- gRPC: the server pings a connection idle for ``grpc_keepalive_s`` and drops it when the
  ping goes unanswered; a connection lives ``grpc_max_connection_age_s`` (then clients
  reconnect, which spreads them over gateway replicas), its running calls
  ``grpc_max_connection_age_grace_s`` more.

``stop_listening`` is how a draining gateway lets its clients go elsewhere.
"""

import asyncio
from dataclasses import dataclass

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


@dataclass(frozen=True)
class Connections:
    header_timeout_s: float = 5.0
    body_timeout_s: float = 30.0
    keep_alive_s: float = 5.0
    max_connections: int = 4096
    grpc_keepalive_s: float = 60.0
    grpc_keepalive_timeout_s: float = 20.0
    grpc_max_connection_idle_s: float = 600.0
    grpc_max_connection_age_s: float = 1800.0
    grpc_max_connection_age_grace_s: float = 600.0

    def grpc_options(self) -> list[tuple[str, int]]:
        ms = lambda seconds: int(seconds * 1000)  # noqa: E731
        return [
            ("grpc.keepalive_time_ms", ms(self.grpc_keepalive_s)),
            ("grpc.keepalive_timeout_ms", ms(self.grpc_keepalive_timeout_s)),
            ("grpc.max_connection_idle_ms", ms(self.grpc_max_connection_idle_s)),
            ("grpc.max_connection_age_ms", ms(self.grpc_max_connection_age_s)),
            ("grpc.max_connection_age_grace_ms", ms(self.grpc_max_connection_age_grace_s)),
            # clients' own keepalive pings (every 10 s at the most) are welcome, not a GOAWAY
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]

    def http_protocol(self) -> type[asyncio.Protocol]:
        """uvicorn's httptools protocol with a deadline on each request's headers: uvicorn
        has none, and a client trickling header bytes keeps its connection forever."""
        return type("HeaderDeadlineProtocol", (_HeaderDeadline,), {"header_timeout_s": self.header_timeout_s})


class _HeaderDeadline(HttpToolsProtocol):
    header_timeout_s = Connections.header_timeout_s
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()  # a connection that never sends a request goes too

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # a keep-alive connection's next request: from its first byte
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()


def stop_listening(grpc_server, http_server, grace_s: float) -> None:
    """Close the public ports' doors for a drain: they take no new connection (the replicas
    sharing the port on this node, or behind the Service, take it), open gRPC connections
    are asked to go (GOAWAY: a client's next call reconnects), HTTP ones close once their
    running request ends (idle ones at once); running requests get ``grace_s``. The HTTP
    server's graceful timeout must cover it (start_http_server's ``drain_timeout_s``)."""
    grpc_server.stop(grace=grace_s)
    http_server.should_exit = True
