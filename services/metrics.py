"""Prometheus metrics of a serving process (the gateway + coordinator), named after vLLM's
with an ``eft_`` prefix. One scrape endpoint holds them all: request metrics from the
gateway, step metrics from the engine, and the workers' KV state, read from every known
worker replica at scrape time.

Useful PromQL (5-minute windows):

- draft acceptance rate::

    sum(rate(eft_spec_decode_num_accepted_tokens_total[5m]))
      / sum(rate(eft_spec_decode_num_draft_tokens_total[5m]))

- p99 inter-token latency, per composition::

    histogram_quantile(0.99, sum by (le, composition) (rate(eft_inter_token_latency_seconds_bucket[5m])))

- p50 time to first token::

    histogram_quantile(0.5, sum by (le) (rate(eft_time_to_first_token_seconds_bucket[5m])))

- output tokens/s: ``sum(rate(eft_generation_tokens_total[1m]))``
- mean implicit reward of a delta: ``rate(eft_implicit_reward_sum[5m]) / rate(eft_implicit_reward_count[5m])``
- acceptance by draft position j: ``rate(eft_spec_decode_num_accepted_tokens_per_pos_total{position="j"}[5m]) / rate(eft_spec_decode_num_drafts_total[5m])``
"""

import logging
import threading
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer

from services.worker.client import info_or_none

log = logging.getLogger(__name__)

# vLLM's buckets, so existing dashboards read ours the same way
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
REWARD_BUCKETS = (-20.0, -10.0, -5.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0)


class ServingMetrics:
    """The metrics, on their own registry (several servers may share one test process)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r, c = self.registry, ["composition"]
        self.ttft = Histogram("eft_time_to_first_token_seconds", "Time from request arrival to its first token", c, buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("eft_inter_token_latency_seconds", "Time between tokens of a request (a chunk of n tokens counts n times, at 1/n of its gap)", c, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("eft_e2e_request_latency_seconds", "Time from request arrival to its end", c, buckets=REQUEST_BUCKETS, registry=r)
        self.queue_time = Histogram("eft_request_queue_time_seconds", "Time a request waited before it joined the running batch", c, buckets=REQUEST_BUCKETS, registry=r)
        self.prompt_tokens = Counter("eft_prompt_tokens", "Prompt tokens of admitted requests (the base model's rendering)", c, registry=r)
        self.generation_tokens = Counter("eft_generation_tokens", "Tokens generated", c, registry=r)
        self.finished = Counter("eft_request_success", "Requests that finished, by finish reason", c + ["finished_reason"], registry=r)
        self.requests = Counter("eft_requests", "Requests by final status code (OK or the gRPC status name)", ["code"], registry=r)
        self.drafts = Counter("eft_spec_decode_num_drafts", "Speculative drafts scored", c, registry=r)
        self.draft_tokens = Counter("eft_spec_decode_num_draft_tokens", "Draft tokens proposed", c, registry=r)
        self.accepted_tokens = Counter("eft_spec_decode_num_accepted_tokens", "Draft tokens accepted", c, registry=r)
        self.accepted_per_position = Counter("eft_spec_decode_num_accepted_tokens_per_pos", "Draft tokens accepted at each draft position (0-based)", c + ["position"], registry=r)
        self.step_latency = Histogram("eft_worker_step_latency_seconds", "Latency of one batched call to a worker, seen by the coordinator", ["worker", "method"], buckets=STEP_BUCKETS, registry=r)
        self.iteration_overhead = Histogram("eft_iteration_overhead_seconds", "Wall time of an engine iteration minus, per call phase, its slowest worker's compute time", buckets=STEP_BUCKETS, registry=r)
        self.batch_size = Histogram("eft_worker_batch_size", "Sessions in one batched call to a worker", ["worker", "method"], buckets=BATCH_BUCKETS, registry=r)
        self.logits_bytes = Counter("eft_logits_bytes", "Tensor bytes received from workers (Extend's logits, Draft's q)", ["worker", "method"], registry=r)
        self.wire_bytes = Counter("eft_wire_bytes", "Tensor bytes received from workers for a composition's requests; over eft_generation_tokens: wire bytes per token", c, registry=r)
        self.implicit_reward = Histogram("eft_implicit_reward", "Implicit reward log p_tuned - log p_reference of each generated token, per delta", c + ["delta"], buckets=REWARD_BUCKETS, registry=r)
        ProcessCollector(registry=r)  # process_resident_memory_bytes and friends
        self._state_sources: list[Callable[[], Iterable[GaugeMetricFamily]]] = []
        r.register(_StateCollector(self._state_sources))

    def add_state(self, source: Callable[[], Iterable[GaugeMetricFamily]]) -> None:
        """A function read at every scrape that returns gauge families (running requests,
        worker KV state)."""
        self._state_sources.append(source)

    def observe_draft(self, composition: str, num_draft: int, num_accepted: int) -> None:
        self.drafts.labels(composition).inc()
        self.draft_tokens.labels(composition).inc(num_draft)
        self.accepted_tokens.labels(composition).inc(num_accepted)
        for position in range(num_accepted):
            self.accepted_per_position.labels(composition, str(position)).inc()

    def observe_worker_call(self, worker: str, method: str, seconds: float, batch: int, bytes_by_composition: dict[str, int]) -> None:
        self.step_latency.labels(worker, method).observe(seconds)
        self.batch_size.labels(worker, method).observe(batch)
        self.logits_bytes.labels(worker, method).inc(sum(bytes_by_composition.values()))
        for composition, received in bytes_by_composition.items():
            self.wire_bytes.labels(composition).inc(received)

    def serve(self, host: str, port: int, routes: dict[str, Callable[[], tuple[int, str]]] | None = None, local_routes: dict[str, Callable[[], tuple[int, str]]] | None = None) -> tuple[object, int]:
        """Start the scrape endpoint (``/metrics``) in a thread; returns the server and its
        port. ``routes``: plain-text answers (status, text) on other paths of this port, which
        has no TLS: KubeRay's health check reaches the gateway here when the public ports
        have TLS on. ``local_routes``: the same, answered to loopback clients only (403 to
        others): commands for the pod's own hooks."""
        app = _routed(make_wsgi_app(self.registry), routes or {}, local_routes or {})
        server = make_server(host, port, app, _SharedPortServer, handler_class=_QuietHandler)
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        return server, server.server_port


class _SharedPortServer(ThreadingWSGIServer):
    allow_reuse_port = True  # gateway replicas on one node share the scrape port too (each scrape reaches one)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # scrapes and probes every few seconds: no access log
        pass


def _routed(metrics_app, routes: dict[str, Callable[[], tuple[int, str]]], local_routes: dict[str, Callable[[], tuple[int, str]]]):
    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        answer = routes.get(path) or local_routes.get(path)
        if answer is None:
            return metrics_app(environ, start_response)
        if path in local_routes and environ.get("REMOTE_ADDR") not in ("127.0.0.1", "::1"):
            answer = lambda: (403, "loopback only")  # noqa: E731
        status, text = answer()
        start_response(f"{status} {HTTPStatus(status).phrase}", [("Content-Type", "text/plain; charset=utf-8")])
        return [text.encode()]

    return app


class _StateCollector:
    def __init__(self, sources):
        self.sources = sources
        self.lock = threading.Lock()

    def collect(self):
        with self.lock:
            for source in list(self.sources):
                try:
                    yield from source()
                except Exception:  # one unreachable worker must not break the whole scrape
                    log.warning("a metrics state source failed", exc_info=True)

    def describe(self):
        return []  # collected at scrape time only


def gauge(name: str, documentation: str, labels: list[str], values: Iterable[tuple[list[str], float]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=labels)
    for label_values, value in values:
        family.add_metric(label_values, value)
    return family


def scheduler_state(scheduler) -> Callable[[], list[GaugeMetricFamily]]:
    """Running and waiting requests, and the mean draft length of running adaptive ones."""

    def read():
        running, waiting = scheduler.snapshot()
        ks: dict[str, list[int]] = {}
        for request in running:
            if request.adaptive:
                ks.setdefault(request.composition.name, []).append(request.current_k)
        return [
            gauge("eft_num_requests_running", "Requests in the running batch", [], [([], len(running))]),
            gauge("eft_num_requests_waiting", "Requests waiting to join it", [], [([], waiting)]),
            gauge("eft_spec_decode_current_k", "Mean draft length of the running adaptive requests in their latest iteration", ["composition"], [([c], sum(k) / len(k)) for c, k in ks.items()]),
        ]

    return read


def worker_state(workers: Callable[[], dict[str, object]], ejected: Callable[[object], str | None]) -> Callable[[], list[GaugeMetricFamily]]:
    """KV sessions and cached tokens of each worker replica (``workers``: label -> client),
    asked at scrape time with a short deadline (a stalled replica is left out, not waited
    on), and whether each is in placement (``ejected``: why a client is out, or None)."""

    def read():
        clients = workers()
        infos = {label: info for label, client in clients.items() if (info := info_or_none(client, SCRAPE_INFO_TIMEOUT_S)) is not None}
        return [
            gauge("eft_worker_kv_sessions", "(session, model) caches a worker holds", ["worker"], [([w], i.sessions) for w, i in infos.items()]),
            gauge("eft_worker_kv_cached_tokens", "Tokens held over all caches of a worker", ["worker"], [([w], i.cached_tokens) for w, i in infos.items()]),
            gauge("eft_worker_in_placement", "1 while a worker replica takes new requests, 0 while it is ejected (failed or stalled calls)", ["worker"], [([w], float(ejected(c) is None)) for w, c in clients.items()]),
        ]

    return read


SCRAPE_INFO_TIMEOUT_S = 1.0


class RequestClock:
    """One request's latency metrics, fed as its chunks arrive. The first chunk gives the
    time to first token; each later chunk of n tokens gives n inter-token latencies of 1/n
    of its gap (a speculative step emits several tokens at once)."""

    def __init__(self, metrics: ServingMetrics, composition: str, arrived: float):
        self.metrics, self.composition, self.arrived = metrics, composition, arrived
        self.last: float | None = None

    def on_tokens(self, count: int, submitted_at: float, admitted_at: float | None) -> None:
        if count == 0:
            return
        now, c = time.monotonic(), self.composition
        if self.last is None:
            self.metrics.ttft.labels(c).observe(now - self.arrived)
            if admitted_at is not None:
                self.metrics.queue_time.labels(c).observe(admitted_at - submitted_at)
        else:
            gap = (now - self.last) / count
            for _ in range(count):
                self.metrics.itl.labels(c).observe(gap)
        self.metrics.generation_tokens.labels(c).inc(count)
        self.last = now

    def on_rewards(self, deltas: list[str], rewards: list[list[float]]) -> None:
        for per_token in rewards:
            for delta, value in zip(deltas, per_token):
                self.metrics.implicit_reward.labels(self.composition, delta).observe(value)

    def on_finish(self, reason: str) -> None:
        self.metrics.e2e.labels(self.composition).observe(time.monotonic() - self.arrived)
        self.metrics.finished.labels(self.composition, reason).inc()
