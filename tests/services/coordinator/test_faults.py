"""Faults of worker replicas, in process: real workers behind real gRPC servers on
127.0.0.1, the real engine and scheduler, deadlines scaled down. A replica *stalls* when
its worker's lock is held (every call and probe then waits, as on a hung GPU), and fails
*fast* when its model calls raise (the server answers INTERNAL; Info still answers)."""

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from eft_core import EFTError, SamplingParams
from services.coordinator.engine import Engine, ReplicaPool, pools_of
from services.coordinator.health import BASE_EJECTION_S, CallPolicy
from services.coordinator.scheduler import Scheduler
from services.errors import status_of
from services.family.compositions import family_compositions
from services.gateway.gateway import Gateway
from services.gateway.openai_api import http_status
from services.gateway.server import SERVICE_NAME, create_server as create_gateway_server
from services.worker.api import WorkerLimits
from services.worker.client import GrpcWorkerClient, model_contexts
from services.worker.server import create_server
from services.worker.worker import ModelWorker, load_hosted_model
from tests.services.coordinator.helpers import make_request, questions, run

TIMEOUT_S = 1.0  # the scaled worker_call_timeout_s
PAIR = ["small-base", "small-tuned", "small-safe"]
BASE = ["large-base", "large-tuned"]


def greedy(tokenizers, max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, stop_token_ids=(tokenizers["large-base"].eos_token_id,))


class FailingWorker(ModelWorker):
    """A replica whose model calls fail (a broken GPU, a bug): Info and Release still answer."""

    def _extend(self, items, logits_dtype):
        raise RuntimeError("injected fault")

    def _draft(self, items, logits_dtype):
        raise RuntimeError("injected fault")


class Replicas:
    """Workers behind gRPC servers; ``client(worker)`` reaches one."""

    def __init__(self, family):
        self.family, self.servers, self.clients = family, [], {}

    def start(self, names: list[str], kind=ModelWorker, limits: WorkerLimits = WorkerLimits()) -> ModelWorker:
        worker = kind([load_hosted_model(n, self.family.model_path(n)) for n in names], limits)
        server, port = create_server(worker, "127.0.0.1:0")
        self.servers.append(server)
        self.clients[worker] = GrpcWorkerClient(f"127.0.0.1:{port}")
        return worker

    def stop(self) -> None:
        for server in self.servers:
            server.stop(grace=None)


@pytest.fixture
def replicas(quick_family):
    started = Replicas(quick_family)
    yield started
    started.stop()


def stream_times(handle) -> tuple[list[float], list, float]:
    """Arrival time of each token, the chunks, and when the final one came."""
    times, chunks = [], []
    for chunk in handle.stream():
        times += [time.monotonic()] * len(chunk.tokens)
        chunks.append(chunk)
    return times, chunks, time.monotonic()


def consume(handles) -> list:
    results = [None] * len(handles)
    threads = [threading.Thread(target=lambda i=i, h=h: results.__setitem__(i, stream_times(h))) for i, h in enumerate(handles)]
    for thread in threads:
        thread.start()
    return threads, results


def test_a_stalled_replica_fails_only_its_requests_others_see_one_short_gap_and_it_returns(replicas, oracle, tokenizers, quick_family):
    base = replicas.start(BASE)
    stalled, healthy = replicas.start(PAIR), replicas.start(PAIR)
    pair = [replicas.clients[stalled], replicas.clients[healthy]]
    engine = Engine({"base": ReplicaPool(tuple(BASE), (replicas.clients[base],)), "pair": ReplicaPool(tuple(PAIR), tuple(pair))}, oracle.vocab_sizes, calls=CallPolicy(timeout_s=TIMEOUT_S))
    scheduler = Scheduler(engine, max_running=16)
    try:
        long = SamplingParams(temperature=1.0, seed=3, max_tokens=400)  # no stop tokens: they run through the stall
        asked = questions(quick_family, n=4)
        upscaled = [scheduler.submit(make_request(i, "upscaled", asked[i], tokenizers, long, draft_k=2 * (i % 2))) for i in range(4)]
        others = [scheduler.submit(make_request(10 + i, "large-tuned", asked[i], tokenizers, long)) for i in range(2)]
        threads, results = consume(upscaled + others)
        while any(len(h.request.tokens) < 20 for h in upscaled + others):
            time.sleep(0.01)
        victims = [h for h in upscaled if h.request.placement.get("small-tuned") is pair[0]]
        assert len(victims) == 2  # least loaded: two requests on each pair replica
        stalled.lock.acquire()  # the replica hangs
        stalled_at = time.monotonic()
        try:
            for thread in threads:
                thread.join(timeout=60)
            assert not any(t.is_alive() for t in threads)
        finally:
            stalled.lock.release()
        ended = {id(h): results[i] for i, h in enumerate(upscaled + others)}
        for victim in victims:
            _, chunks, _ = ended[id(victim)]
            assert chunks[-1].error is not None and chunks[-1].error.code == "UNAVAILABLE" and "did not answer" in chunks[-1].error.message, chunks[-1]
        unavailable_after = max(ended[id(v)][2] for v in victims) - stalled_at
        assert unavailable_after < TIMEOUT_S + 1.0
        gaps = []
        for handle in [h for h in upscaled if h not in victims] + others:
            times, chunks, _ = ended[id(handle)]
            assert chunks[-1].finish_reason == "length" and len(times) == 400, chunks[-1]
            gaps.append(max(b - a for a, b in zip(times, times[1:])))
            assert sum(b - a > TIMEOUT_S / 2 for a, b in zip(times, times[1:])) <= 1  # one gap, then the normal pace
        assert max(gaps) < TIMEOUT_S + 0.5, gaps
        time.sleep(BASE_EJECTION_S + 1)  # the replica answers again: its probe readmits it after its ejection time
        returned = make_request(20, "upscaled", asked[0], tokenizers, greedy(tokenizers, 8), draft_k=2)
        handle = scheduler.submit(returned)
        list(handle.stream())
        assert returned.error is None and returned.tokens == oracle.generate("upscaled", asked[0], greedy(tokenizers, 8)).generation.tokens
        print(f"stall of one pair replica (deadline {TIMEOUT_S} s): its 2 requests UNAVAILABLE after at most {unavailable_after:.2f} s; the 4 others' largest token gap {max(gaps):.2f} s")
        engine.wait_released(10)
        deadline = time.monotonic() + 10  # the probe that readmits it frees them, off the engine's releases
        while stalled.info().sessions and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stalled.info().sessions == 0 and healthy.info().sessions == 0  # the stalled replica freed its requests' sessions on its return
    finally:
        scheduler.close()
        engine.close()


def test_a_replica_failing_every_call_leaves_placement_after_its_first_failure(replicas, oracle, tokenizers, quick_family):
    base = replicas.start(BASE)
    good, broken = replicas.start(PAIR), replicas.start(PAIR, FailingWorker)
    pair = [replicas.clients[good], replicas.clients[broken]]
    engine = Engine({"base": ReplicaPool(tuple(BASE), (replicas.clients[base],)), "pair": ReplicaPool(tuple(PAIR), tuple(pair))}, oracle.vocab_sizes, calls=CallPolicy(timeout_s=TIMEOUT_S))
    scheduler = Scheduler(engine, max_running=8)
    params = greedy(tokenizers, 6)
    asked = questions(quick_family, n=4)
    try:
        first_wave = [scheduler.submit(make_request(i, "upscaled", asked[i % 4], tokenizers, params, draft_k=2)) for i in range(8)]
        for handle in first_wave:
            list(handle.stream())
        first_failures = sum(h.request.error is not None for h in first_wave)
        assert 1 <= first_failures <= 4  # those placed on the broken replica before its first failure was seen
        later = []
        for wave in range(5):  # 40 more requests, 8 at a time
            handles = [scheduler.submit(make_request(100 + 8 * wave + i, "upscaled", asked[i % 4], tokenizers, params, draft_k=2)) for i in range(8)]
            for handle in handles:
                list(handle.stream())
            later += handles
        failed = [h.request for h in later if h.request.error is not None]
        assert len(failed) <= 2, [r.error for r in failed]
        assert all(r.error.code == "UNAVAILABLE" for r in failed)
        expected = {i: oracle.generate("upscaled", asked[i], params).generation.tokens for i in range(4)}
        assert all(h.request.tokens == expected[int(h.request.id[1:]) % 4] for h in later if h.request.error is None)
        print(f"one of two pair replicas failing every call: {first_failures} requests failed at its first failure, {len(failed)} of the 40 after it")
    finally:
        scheduler.close()
        engine.close()


def test_a_lost_cache_with_a_pending_rollback_fails_that_request_alone(replicas, oracle, tokenizers, quick_family):
    base, pair = replicas.start(BASE), replicas.start(PAIR)
    engine = Engine(pools_of({**{m: replicas.clients[base] for m in BASE}, **{m: replicas.clients[pair] for m in PAIR}}), oracle.vocab_sizes, calls=CallPolicy(timeout_s=TIMEOUT_S))
    params = greedy(tokenizers, 24)
    asked = questions(quick_family, n=2)
    lost, mate = (make_request(i, "upscaled", asked[i], tokenizers, params, draft_k=4) for i in range(2))
    for _ in range(20):  # until a rejected draft leaves a rollback to ride on the next call
        engine.step([lost, mate])
        if lost.cache.rollback:
            break
    assert lost.cache.rollback and not lost.done
    for worker in (base, pair):
        worker.release([lost.id, lost.id + "#draft"])  # freed as idle, say
    run(engine, [lost, mate])
    assert lost.error.code == "UNAVAILABLE" and "lost this request's cache" in lost.error.message, lost.error
    assert mate.tokens == oracle.generate("upscaled", asked[1], params).generation.tokens  # its batch-mate was served
    assert base.info().sessions == pair.info().sessions == 0
    engine.close()


def test_a_full_worker_fails_the_request_over_its_budget_as_overloaded(replicas, oracle, tokenizers, quick_family):
    base, pair = replicas.start(BASE), replicas.start(PAIR, limits=WorkerLimits(max_sessions=4))  # both drafters, then one request's 2 scored caches
    engine = Engine(pools_of({**{m: replicas.clients[base] for m in BASE}, **{m: replicas.clients[pair] for m in PAIR}}), oracle.vocab_sizes, calls=CallPolicy(timeout_s=TIMEOUT_S))
    params = greedy(tokenizers, 8)
    asked = questions(quick_family, n=2)
    served, refused = (make_request(i, "upscaled", asked[i], tokenizers, params, draft_k=2) for i in range(2))
    run(engine, [served, refused])
    assert refused.error is not None and refused.error.code == "RESOURCE_EXHAUSTED" and "is full" in refused.error.message, refused.error
    assert status_of(refused.error) == grpc.StatusCode.RESOURCE_EXHAUSTED and http_status(refused.error) == 429  # retry later, not a bad request
    assert served.tokens == oracle.generate("upscaled", asked[0], params).generation.tokens
    assert engine.health.is_ejected(replicas.clients[pair]) is None  # a full replica is healthy
    engine.close()


def test_health_reports_a_composition_whose_only_replica_is_out(replicas, oracle, tokenizers, quick_family):
    base, pair = replicas.start(BASE), replicas.start(PAIR)
    engine = Engine(pools_of({**{m: replicas.clients[base] for m in BASE}, **{m: replicas.clients[pair] for m in PAIR}}), oracle.vocab_sizes, calls=CallPolicy(timeout_s=TIMEOUT_S))
    scheduler = Scheduler(engine)
    gateway = Gateway(family_compositions(), tokenizers, model_contexts(replicas.clients.values()), scheduler, "upscaled")
    server, port = create_gateway_server(gateway)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    checks = health_pb2_grpc.HealthStub(channel)

    def status(name: str) -> int:
        return checks.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    try:
        assert status(f"{SERVICE_NAME}/upscaled") == serving
        pair.lock.acquire()
        try:
            request = make_request(0, "upscaled", questions(quick_family)[0], tokenizers, SamplingParams(temperature=0, max_tokens=4))
            list(scheduler.submit(request).stream())
            assert request.error.code == "UNAVAILABLE"
            assert gateway.health() == {"": True, "upscaled": False, "small-tuned": False, "mixed": False, "large-base": True, "large-tuned": True}
            time.sleep(2.5)  # the server's health follows within its refresh period
            assert [status(f"{SERVICE_NAME}/{c}") for c in ("upscaled", "mixed", "large-base")] == [not_serving, not_serving, serving]
            assert status("") == status(SERVICE_NAME) == serving  # other compositions still serve
            refused = make_request(1, "upscaled", questions(quick_family)[0], tokenizers, SamplingParams(temperature=0, max_tokens=4))
            list(scheduler.submit(refused).stream())
            assert refused.error.code == "UNAVAILABLE" and "out of placement" in refused.error.message  # at once: nothing waits on the stalled replica
        finally:
            pair.lock.release()
        deadline = time.monotonic() + 15
        while not engine.servable(family_compositions()["upscaled"]):
            assert time.monotonic() < deadline, "the replica did not return"
            time.sleep(0.2)
    finally:
        channel.close()
        server.stop(grace=None)
        scheduler.close()
        engine.close()


def test_a_replica_error_is_never_invalid_argument(replicas, oracle, tokenizers, quick_family):
    """Each way a worker fails reaches the request as a server-side status."""
    base, broken = replicas.start(BASE), replicas.start(PAIR, FailingWorker)
    engine = Engine(pools_of({**{m: replicas.clients[base] for m in BASE}, **{m: replicas.clients[broken] for m in PAIR}}), oracle.vocab_sizes, calls=CallPolicy(timeout_s=TIMEOUT_S))
    request = make_request(0, "upscaled", questions(quick_family)[0], tokenizers, SamplingParams(temperature=1.0, seed=7, max_tokens=4), draft_k=2)
    run(engine, [request])
    assert isinstance(request.error, EFTError) and request.error.code == "UNAVAILABLE" and "INTERNAL" in request.error.message, request.error
    assert request.draft_params.seed not in (None, request.params.seed)  # the drafter draws from its own stream
    engine.close()
