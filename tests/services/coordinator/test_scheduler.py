"""Continuous batching through the scheduler, over workers in process."""

import threading
import time

import pytest

from eft_core import ResourceExhaustedError, SamplingParams
from services.coordinator.engine import Engine, pools_of
from services.coordinator.scheduler import Scheduler
from tests.services.coordinator.helpers import make_request, questions


@pytest.fixture
def scheduler(workers, oracle):
    placement, _ = workers
    scheduler = Scheduler(Engine(pools_of(placement), oracle.vocab_sizes), max_running=8, max_waiting=16)
    yield scheduler
    scheduler.close()


def collect(handle):
    chunks = list(handle.stream())
    return [t for c in chunks for t in c.tokens], chunks


def test_concurrent_streams_all_complete_with_the_reference_outputs(scheduler, workers, oracle, tokenizers, quick_family):
    _, worker_objects = workers
    eos = tokenizers["large-base"].eos_token_id
    asked = questions(quick_family, n=4)
    cases = [(asked[i % 4], ("upscaled", "mixed")[i % 2], (0, 2)[i // 8]) for i in range(16)]
    params = SamplingParams(temperature=0, max_tokens=10, stop_token_ids=(eos,))
    results = [None] * len(cases)

    def client(i):
        messages, composition, draft_k = cases[i]
        handle = scheduler.submit(make_request(i, composition, messages, tokenizers, params, draft_k=draft_k))
        results[i] = collect(handle)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for (messages, composition, _), (tokens, chunks) in zip(cases, results):
        expected = oracle.generate(composition, messages, params).generation
        assert tokens == expected.tokens
        assert chunks[-1].final and chunks[-1].finish_reason == expected.finish_reason
    assert [w.info().sessions for w in worker_objects] == [0, 0]
    assert scheduler.counts == (0, 0)


def test_cancellation_mid_stream_releases_every_session(scheduler, workers, tokenizers, quick_family):
    _, worker_objects = workers
    handle = scheduler.submit(make_request(0, "mixed", questions(quick_family)[0], tokenizers, SamplingParams(temperature=0, max_tokens=40), draft_k=2))
    stream = handle.stream()
    first = next(stream)
    assert first.tokens and not first.final
    handle.cancel()
    last = list(stream)[-1]
    assert last.final and last.finish_reason == "cancelled"
    assert [w.info().sessions for w in worker_objects] == [0, 0]


def test_deadline_expiry_releases_every_session(scheduler, workers, tokenizers, quick_family):
    _, worker_objects = workers
    handle = scheduler.submit(make_request(0, "upscaled", questions(quick_family)[0], tokenizers, SamplingParams(temperature=0, max_tokens=45)), timeout=0.0)
    tokens, chunks = collect(handle)
    assert chunks[-1].finish_reason == "deadline" and len(tokens) < 45
    assert [w.info().sessions for w in worker_objects] == [0, 0]


def test_a_full_queue_refuses_at_once(scheduler, tokenizers, quick_family):
    request = lambda i: make_request(i, "upscaled", questions(quick_family)[0], tokenizers, SamplingParams(temperature=0, max_tokens=3))  # noqa: E731
    with scheduler.condition:  # hold the loop back: nothing is admitted meanwhile
        handles = [scheduler.submit(request(i)) for i in range(8 + 16)]  # a burst fills the running places, then the queue
        started = time.monotonic()
        with pytest.raises(ResourceExhaustedError, match="0 requests run and 24 wait"):
            scheduler.submit(request(99))
        assert time.monotonic() - started < 0.5
    assert all(collect(h)[1][-1].finish_reason == "length" for h in handles)
