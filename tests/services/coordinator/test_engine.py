"""The engine over real workers (reduced family) against the eft_core reference loop."""

import math

import pytest
import torch

from eft_core import SamplingParams
from eft_core.draft_length import DraftLengthTuner
from services.coordinator.engine import Engine, ReplicaPool, pools_of
from services.coordinator.health import CallPolicy
from services.coordinator.load import ReplicaLoad
from services.prompts import TokenPrompt
from tests.services.coordinator.helpers import make_request, questions, run, scored_prompt


@pytest.mark.parametrize("composition", ["upscaled", "mixed"])
@pytest.mark.parametrize("draft_k", [0, 1, 4])
def test_greedy_matches_the_reference_loop(workers, oracle, tokenizers, quick_family, composition, draft_k):
    placement, worker_objects = workers
    eos = tokenizers["large-base"].eos_token_id
    params = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=(eos,))
    engine = Engine(pools_of(placement), oracle.vocab_sizes)
    asked = questions(quick_family)
    requests = [make_request(i, composition, m, tokenizers, params, draft_k=draft_k) for i, m in enumerate(asked[:2])]
    late = [make_request(i + 2, composition, m, tokenizers, params, draft_k=draft_k) for i, m in enumerate(asked[2:])]
    run(engine, requests, late)
    for r, messages in zip(requests, asked):
        expected = oracle.generate(composition, messages, params)
        assert r.tokens == expected.generation.tokens, (r.id, r.tokens, expected.generation.tokens)
        assert r.finish_reason == expected.generation.finish_reason
        assert r.logprobs == pytest.approx(expected.generation.logprobs, abs=1e-4)
        if draft_k:  # greedy drafts are deterministic too: the same drafts, the same acceptances
            speculative = oracle.generate(composition, messages, params, draft_k=draft_k).generation
            assert speculative.tokens == expected.generation.tokens
            assert r.stats == speculative.stats
    if draft_k:  # the drafter was sometimes wrong: rejected drafts were rolled back
        accepted, drafted = sum(r.stats.accepted_tokens for r in requests), sum(r.stats.draft_tokens for r in requests)
        assert 0 < accepted < drafted
    assert all(w.info().sessions == 0 for w in worker_objects)  # finished requests released everything


def test_zero_weights_give_the_base_models_own_output(workers, oracle, tokenizers, quick_family):
    placement, _ = workers
    params = SamplingParams(temperature=0, max_tokens=10)
    engine = Engine(pools_of(placement), oracle.vocab_sizes)
    messages = questions(quick_family)[0]
    request = make_request(0, "upscaled", messages, tokenizers, params, weights={"chat": 0.0}, draft_k=2)
    run(engine, [request])
    assert request.tokens == oracle.generate("large-base", messages, params).generation.tokens


def test_seeded_sampling_is_the_same_alone_or_among_others(workers, oracle, tokenizers, quick_family):
    placement, _ = workers
    engine = Engine(pools_of(placement), oracle.vocab_sizes)
    messages = questions(quick_family)
    mine = SamplingParams(temperature=1.0, seed=7, max_tokens=10)
    for draft_k in (0, 3):
        alone = make_request(0, "upscaled", messages[0], tokenizers, mine, draft_k=draft_k)
        run(engine, [alone])
        crowd = [make_request(i + 1, "upscaled", messages[i % 4], tokenizers, SamplingParams(temperature=1.0, max_tokens=5 + i)) for i in range(7)]
        again = make_request(9, "upscaled", messages[0], tokenizers, mine, draft_k=draft_k)
        run(engine, crowd + [again])
        assert again.tokens == alone.tokens


def test_releasing_mid_generation_frees_every_session(workers, oracle, tokenizers, quick_family):
    placement, worker_objects = workers
    engine = Engine(pools_of(placement), oracle.vocab_sizes)
    requests = [make_request(i, "mixed", m, tokenizers, SamplingParams(temperature=0, max_tokens=30), draft_k=2) for i, m in enumerate(questions(quick_family))]
    engine.step(requests)
    engine.step(requests)
    assert sum(w.info().sessions for w in worker_objects) > 0
    engine.release(requests).result()  # what cancellation and deadlines do
    assert [w.info().sessions for w in worker_objects] == [0, 0]


@pytest.mark.parametrize("draft_k", [1, 3])
def test_every_cache_plus_its_unsent_tokens_is_the_whole_sequence(workers, oracle, tokenizers, quick_family, draft_k):
    placement, _ = workers
    engine = Engine(pools_of(placement), oracle.vocab_sizes)
    requests = [make_request(i, "upscaled", m, tokenizers, SamplingParams(temperature=0.7, seed=i, max_tokens=20), draft_k=draft_k) for i, m in enumerate(questions(quick_family))]
    checked = 0
    while not all(r.done for r in requests):
        engine.step(requests)
        for r in (r for r in requests if not r.done):
            drafter = r.composition.drafter_model
            for key, model in [*((m, m) for m in r.composition.scored_models), ("#draft", drafter)]:
                assert r.cache.cached[key] + len(r.cache.unsent[key]) == len(r.prompts[model]) + len(r.tokens), (r.id, key)
                checked += 1
    engine.wait_released()  # releases run off the loop: the module's next test starts with empty workers
    assert checked > 20


@pytest.fixture(scope="module")
def two_pair_replicas(quick_family):
    """The base worker and two replicas of the pair group, in process: (base, pairs, pools)."""
    from services.worker.client import InProcessWorkerClient
    from services.worker.worker import ModelWorker, load_hosted_model

    def load(names):
        return ModelWorker([load_hosted_model(n, quick_family.model_path(n)) for n in names])

    base, pairs = load(["large-base", "large-tuned"]), [load(["small-base", "small-tuned", "small-safe"]) for _ in range(2)]
    placement = {"large-base": InProcessWorkerClient(base), "large-tuned": InProcessWorkerClient(base)}
    pools = pools_of(placement) | {"pair": ReplicaPool(("small-base", "small-tuned", "small-safe"), tuple(InProcessWorkerClient(p) for p in pairs))}
    return base, pairs, pools


def test_requests_spread_over_replicas_and_stay_on_theirs(two_pair_replicas, quick_family, oracle, tokenizers):
    """Two replicas of the pair group: requests are placed on the least loaded one and every
    step of a request goes to the replica that holds its caches."""
    base, pairs, pools = two_pair_replicas
    engine = Engine(pools, oracle.vocab_sizes)
    params = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=(tokenizers["large-base"].eos_token_id,))
    asked = questions(quick_family)
    requests = [make_request(i, "mixed", m, tokenizers, params, draft_k=2) for i, m in enumerate(asked)]
    engine.step(requests)
    assert [p.info().sessions for p in pairs] == [2 * 4, 2 * 4]  # 2 requests each: 3 small models + the drafter
    run(engine, requests)
    for r, messages in zip(requests, asked):
        assert r.tokens == oracle.generate("mixed", messages, params).generation.tokens
    assert [p.info().sessions for p in pairs] == [0, 0] and base.info().sessions == 0


def test_coordinators_side_by_side_place_by_what_the_replicas_report(two_pair_replicas, quick_family, oracle, tokenizers):
    """Two engines (two gateways) over the same replicas: each sees the other's sessions only
    through the replicas' reports (the directory's Info polling); with them the second
    request goes to the idle replica, on its own counts alone it would join the first."""
    _, pairs, pools = two_pair_replicas
    clients = pools["pair"].replicas
    first, second, blind = (Engine(pools, oracle.vocab_sizes) for _ in range(3))
    params = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=(tokenizers["large-base"].eos_token_id,))
    asked = questions(quick_family)
    held = make_request(0, "mixed", asked[0], tokenizers, params, draft_k=2)
    first.step([held])
    assert [p.info().sessions for p in pairs] == [4, 0]
    for client in clients:
        second.report_load(client, client.info().sessions)
    placed = make_request(1, "mixed", asked[1], tokenizers, params, draft_k=2)
    second.step([placed])
    assert placed.placement["small-tuned"] is clients[1] and [p.info().sessions for p in pairs] == [4, 4]
    unaware = make_request(2, "mixed", asked[2], tokenizers, params)
    blind.step([unaware])  # no report: its own (empty) counts, the first replica
    assert unaware.placement["small-tuned"] is clients[0]
    for engine, requests in ((first, [held]), (second, [placed]), (blind, [unaware])):
        run(engine, requests)
        engine.wait_released()
    assert held.tokens == oracle.generate("mixed", asked[0], params).generation.tokens
    assert [p.info().sessions for p in pairs] == [0, 0]


def test_replica_load_is_the_last_report_moved_by_ones_own_changes_since():
    load = ReplicaLoad()
    load.placed("a", 3)
    assert load.of("a") == 3 and load.of("b") == 0
    load.report("a", 10)  # 7 of them another coordinator's
    load.placed("a", 2)
    load.released("a", 3)
    assert load.of("a") == 9 and load.holds_mine("a")
    load.report("b", 0)
    load.placed("b", 4)
    assert load.of("b") == 4
    load.released("a", 2)
    load.report("a", 0)  # a report older than a placement never hides this coordinator's own sessions
    load.placed("a", 1)
    assert load.of("a") == 1
    load.forget(["a"])
    assert load.of("a") == 1 and load.holds_mine("b")


def test_replica_changes_apply_to_new_requests_and_an_empty_group_is_unavailable(workers, oracle, tokenizers, quick_family):
    from services.worker.client import GrpcWorkerClient

    placement, worker_objects = workers
    engine = Engine(pools_of(placement), oracle.vocab_sizes)
    params = SamplingParams(temperature=0, max_tokens=4, stop_token_ids=(tokenizers["large-base"].eos_token_id,))
    pair = engine.pool_of["small-tuned"]  # the pair worker's group
    engine.set_replicas(pair, [])
    refused = make_request(0, "upscaled", questions(quick_family)[0], tokenizers, params)
    engine.step([refused])
    assert refused.finish_reason == "error" and refused.error.code == "UNAVAILABLE" and "small-tuned" in refused.error.message
    assert refused.placement == {} and sum(w.info().sessions for w in worker_objects) == 0

    gone = GrpcWorkerClient("127.0.0.1:1", timeout=5)  # nothing listens there: a replica that died
    engine.set_replicas(pair, [gone])
    failed = make_request(1, "upscaled", questions(quick_family)[0], tokenizers, params)
    engine.step([failed])  # the pair's call fails, the base's succeeds; releasing on the dead replica is logged, not raised
    engine.wait_released()
    assert failed.error.code == "UNAVAILABLE" and failed.placement == {}
    assert sum(w.info().sessions for w in worker_objects) == 0

    engine.set_replicas(pair, [placement["small-base"]])
    served = make_request(2, "upscaled", questions(quick_family)[0], tokenizers, params)
    run(engine, [served])
    assert served.tokens == oracle.generate("upscaled", questions(quick_family)[0], params).generation.tokens


def test_a_cache_the_worker_lost_fails_its_request_instead_of_decoding_from_a_wrong_context(workers, oracle, tokenizers, quick_family):
    """A worker that freed a request's sessions (idle timeout, or a new replica at the same
    address) answers the next call from an empty cache: the engine notices the length."""
    placement, worker_objects = workers
    engine = Engine(pools_of(placement), oracle.vocab_sizes)
    params = SamplingParams(temperature=0, max_tokens=20, stop_token_ids=(tokenizers["large-base"].eos_token_id,))
    lost, other = (make_request(i, "upscaled", m, tokenizers, params) for i, m in enumerate(questions(quick_family)[:2]))
    engine.step([lost, other])
    for worker in worker_objects:
        worker.release([lost.id, lost.id + "#draft"])
    engine.step([lost, other])
    assert lost.finish_reason == "error" and lost.error.code == "UNAVAILABLE" and "lost this request's cache" in lost.error.message
    run(engine, [lost, other])
    assert other.tokens == oracle.generate("upscaled", questions(quick_family)[1], params).generation.tokens
    assert sum(w.info().sessions for w in worker_objects) == 0


@pytest.mark.parametrize("choices", [(0,), (3,), (0, 2)])
def test_adaptive_requests_draft_the_tuners_choice_and_stay_exact(workers, oracle, tokenizers, quick_family, choices):
    """(0,): speculation off for them all along, (3,): always 3, (0, 2): k changing between
    iterations, to and from 0 (the other choice is probed every second iteration), while
    the drafter's cache follows."""
    placement, _ = workers
    engine = Engine(pools_of(placement), oracle.vocab_sizes)
    engine.tuner = DraftLengthTuner(choices=choices, start=0, explore_every=2)
    params = SamplingParams(temperature=0, max_tokens=30, stop_token_ids=(tokenizers["large-base"].eos_token_id,))
    requests = [make_request(i, "upscaled", m, tokenizers, params, draft_k=4) for i, m in enumerate(questions(quick_family))]
    for r in requests:
        r.adaptive = True
    ran = []
    choose = engine.tuner.choose
    engine.tuner.choose = lambda context: ran.append(choose(context)) or ran[-1]
    run(engine, requests)
    drafted = sum(r.stats.draft_tokens for r in requests)
    assert set(ran) <= set(choices) and (drafted == 0) == (choices == (0,)), ran
    if len(choices) > 1:
        assert 0 in ran and max(ran) > 0, ran
    for r, messages in zip(requests, questions(quick_family)):
        assert r.tokens == oracle.generate("upscaled", messages, params).generation.tokens


class _Counting:
    """A worker client that records each call's method and item count."""

    def __init__(self, client):
        self.client, self.calls = client, []

    def start(self, method, items, timeout=None):
        self.calls.append((method, len(items)))
        return self.client.start(method, items, timeout)

    def __getattr__(self, name):
        return getattr(self.client, name)


def test_a_batch_whose_answer_would_pass_the_size_limit_is_split_and_decides_the_same(workers, oracle, tokenizers, quick_family):
    """With the answer limit set to one speculating item's logits, every call carries one
    item, and the tokens are the oracle's all the same."""
    from services.coordinator.health import CallPolicy

    placement, worker_objects = workers
    counting = {c: _Counting(c) for c in dict.fromkeys(placement.values())}
    vocab = oracle.vocab_sizes["mixed"]
    params = SamplingParams(temperature=0, max_tokens=10, stop_token_ids=(tokenizers["large-base"].eos_token_id,))
    asked = questions(quick_family)[:3]
    for limit, most in [(4 * vocab * 5, 1), (CallPolicy.max_answer_bytes, 3 * 3)]:  # (k + 1) float32 rows; the default
        engine = Engine(pools_of({m: counting[c] for m, c in placement.items()}), oracle.vocab_sizes, calls=CallPolicy(max_answer_bytes=limit))
        requests = [make_request(i, "mixed", m, tokenizers, params, draft_k=4) for i, m in enumerate(asked)]
        run(engine, requests)
        for r, messages in zip(requests, asked):
            assert r.tokens == oracle.generate("mixed", messages, params).generation.tokens
        sizes = [n for c in counting.values() for method, n in c.calls if method == "extend"]
        assert max(sizes) == most, sizes  # by default one call: 3 requests x the pair's 3 scored models
        for c in counting.values():
            c.calls.clear()
    assert all(w.info().sessions == 0 for w in worker_objects)


class _Corrupting(_Counting):
    """Answers one request's items of one method with a result of the wrong shape (as a
    buggy worker would)."""

    def __init__(self, client, victim: str, method: str):
        super().__init__(client)
        self.victim, self.method = victim, method

    def start(self, method, items, timeout=None):
        from dataclasses import replace

        from services.worker.api import DraftQ

        call = super().start(method, items, timeout)

        class Corrupted:
            compute_seconds = 0.0

            def result(inner):
                answers = call.result()
                hit = lambda item: method == self.method and item.session_id.split("#")[0] == self.victim  # noqa: E731
                return [self._corrupt(a, replace, DraftQ) if hit(item) else a for item, a in zip(items, answers)]

        return Corrupted()

    @staticmethod
    def _corrupt(answer, replace, DraftQ):
        if hasattr(answer, "logits"):
            return replace(answer, logits=answer.logits[:, :5])  # too few vocabulary columns
        return replace(answer, q=DraftQ(answer.q.at_drafts, row_sizes=answer.q.row_sizes, indices=answer.q.indices + 10**6, values=answer.q.values))  # ids past the vocabulary


@pytest.mark.parametrize("method", ["extend", "draft"])
def test_a_malformed_answer_fails_its_request_alone_with_internal(workers, oracle, tokenizers, quick_family, method):
    placement, worker_objects = workers
    params = SamplingParams(temperature=0, max_tokens=8, stop_token_ids=(tokenizers["large-base"].eos_token_id,))
    asked = questions(quick_family)[:3]
    requests = [make_request(i, "upscaled", m, tokenizers, params, draft_k=2) for i, m in enumerate(asked)]
    pair = placement["small-tuned"]  # the pair worker: it scores the delta and drafts
    corrupting = _Corrupting(pair, requests[1].id, method)
    engine = Engine(pools_of({m: corrupting if c is pair else c for m, c in placement.items()}), oracle.vocab_sizes)
    run(engine, requests)
    failed = requests[1]
    assert failed.finish_reason == "error" and failed.error.code == "INTERNAL" and "malformed" in failed.error.message, failed.error
    for r, messages in [(requests[0], asked[0]), (requests[2], asked[2])]:
        assert r.tokens == oracle.generate("upscaled", messages, params).generation.tokens
    assert all(w.info().sessions == 0 for w in worker_objects)


def test_iteration_timing_splits_wall_time_into_the_slowest_workers_compute_and_overhead(workers, oracle, tokenizers, quick_family):
    placement, _ = workers
    engine = Engine(pools_of(placement), oracle.vocab_sizes)
    params = SamplingParams(temperature=0, max_tokens=6)
    requests = [make_request(i, "upscaled", m, tokenizers, params, draft_k=2) for i, m in enumerate(questions(quick_family)[:2])]
    steps = 0
    while not all(r.done for r in requests):
        engine.step(requests)
        steps += 1
    timing = engine.timing
    assert timing.iterations == steps
    assert 0 < timing.compute_seconds < timing.wall_seconds  # in process, a call's compute is its whole time; gRPC adds transport
    engine.wait_released()  # releases run off the loop: the module's next test reuses the request ids


@pytest.mark.parametrize("composition", ["upscaled", "mixed"])
@pytest.mark.parametrize("answer_rows", [None, 3])
def test_prompt_logprobs_and_top_logprobs_equal_the_oracles_scoring(workers, oracle, tokenizers, quick_family, composition, answer_rows):
    """Prompts scored in a batch with an unscored request, a speculating one and a score-only
    one: every prompt token's EFT logprob and top logprobs, and every emitted token's top
    logprobs, equal the oracle's one forward over the whole sequence (no cache) within 1e-5.
    ``answer_rows`` 3: a worker answer holds 3 rows of logits, so each prompt is sent and
    scored 3 tokens an iteration (as a 128k vocabulary's 512 rows in 256 MiB)."""
    placement, worker_objects = workers
    calls = CallPolicy(max_answer_bytes=4 * oracle.vocab_sizes[composition] * answer_rows) if answer_rows else CallPolicy()
    engine = Engine(pools_of(placement), oracle.vocab_sizes, calls=calls)
    texts = [f"the {a} of {e} is" for e in quick_family.world().entities[:2] for a in ("capital", "animal")]
    params = SamplingParams(temperature=0, max_tokens=6, stop_token_ids=(tokenizers["large-base"].eos_token_id,))
    requests = [make_request(i, composition, text, tokenizers, params, draft_k=3 * (i == 1)) for i, text in enumerate(texts)]
    for r, top in zip(requests[:3], (3, 5, 0)):
        r.score_prompt, r.top_logprobs = True, top
    requests[2].score_only = True
    steps = 0
    while not requests[2].done:
        engine.step(requests)
        steps += 1
    run(engine, requests)
    assert steps == (math.ceil(len(requests[2].prompts["large-base"]) / answer_rows) if answer_rows else 1)  # score-only: one part an iteration
    for r, text in zip(requests[:3], texts):
        _, expected, scores = scored_prompt(oracle, composition, TokenPrompt(tuple(r.prompts["large-base"] + r.tokens)))
        assert len(r.prompt_logprobs) == len(r.prompts["large-base"]) - 1 > 0, r.error
        assert r.prompt_logprobs == pytest.approx(expected[: len(r.prompt_logprobs)], abs=1e-5)
        assert r.tokens == ([] if r.score_only else oracle.generate(composition, text, params).generation.tokens)
        rows = list(range(len(r.prompt_logprobs))), list(range(len(r.prompt_logprobs), len(r.prompt_logprobs) + len(r.tokens)))
        for tops, positions in zip((r.prompt_top, r.top), rows):
            assert len(tops) == (len(positions) if r.top_logprobs else len(tops)) and all(len(t) == r.top_logprobs for t in tops)
            for top, position in zip(tops, positions):
                values, ids = scores[position].topk(r.top_logprobs)
                assert [i for i, _ in top] == ids.tolist() and [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-5)
        if r.top_logprobs and r.tokens:  # greedy: each token is its position's most probable, with the same logprob
            assert [t[0] for t in r.top] == list(zip(r.tokens, r.logprobs))
    assert requests[2].finish_reason == "length" and requests[3].prompt_logprobs == [] and requests[3].top == [[]] * len(requests[3].tokens)
    assert all(w.info().sessions == 0 for w in worker_objects)


@pytest.mark.parametrize("draft_k", [0, 3])
def test_each_models_own_view_of_the_emitted_tokens_is_its_log_softmax(workers, oracle, tokenizers, quick_family, draft_k):
    """model_logprobs: per emitted token (accepted drafts too), every scored model's own
    logprob of it and its top logprobs, equal the oracle's per-model logits at that position."""
    placement, worker_objects = workers
    engine = Engine(pools_of(placement), oracle.vocab_sizes)
    params = SamplingParams(temperature=0, max_tokens=8, stop_token_ids=(tokenizers["large-base"].eos_token_id,))
    messages = questions(quick_family)[1]
    asking, other = (make_request(i, "mixed", messages, tokenizers, params, draft_k=draft_k) for i in (0, 1))
    asking.model_logprobs, asking.top_logprobs = True, 2
    run(engine, [asking, other])
    want = oracle.generate("mixed", messages, params, keep_logits=True)
    assert asking.tokens == want.generation.tokens and len(asking.model_views) == len(want.step_logits)
    vocab = oracle.vocab_sizes["mixed"]
    for token, view, logits in zip(asking.tokens, asking.model_views, want.step_logits):
        assert set(view) == set(oracle.compositions["mixed"].scored_models)
        for model, (logprob, top) in view.items():
            own = torch.log_softmax(logits[model][:vocab].float(), dim=-1)
            values, ids = own.topk(2)
            assert logprob == pytest.approx(float(own[token]), abs=1e-5) and [i for i, _ in top] == ids.tolist()
            assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-5)
    assert other.model_views == [{}] * len(other.tokens)
    assert all(w.info().sessions == 0 for w in worker_objects)
