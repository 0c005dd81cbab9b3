"""EFTService end to end in one process: gateway, scheduler, engine and workers (the workers
behind real gRPC servers), all on 127.0.0.1, against the eft_core reference loop."""

import math
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from eft_core import SamplingParams
from services.coordinator.engine import Engine, pools_of
from services.coordinator.scheduler import Scheduler
from services.family.compositions import family_compositions
from services.gateway.gateway import Gateway, Limits
from services.gateway.server import SERVICE_NAME, create_server
from services.pb.eft.v1 import eft_pb2, eft_pb2_grpc
from services.worker.client import model_contexts
from services.prompts import TokenPrompt
from tests.services.coordinator.helpers import questions, scored_prompt, start_workers

OFF, FIXED, ADAPTIVE = eft_pb2.SPECULATION_MODE_OFF, eft_pb2.SPECULATION_MODE_FIXED, eft_pb2.SPECULATION_MODE_ADAPTIVE


@pytest.fixture(scope="module")
def service(quick_family, oracle, tokenizers):
    placement, worker_objects, stop_workers = start_workers(quick_family, "grpc")
    scheduler = Scheduler(Engine(pools_of(placement), oracle.vocab_sizes), max_running=16, max_waiting=32)
    gateway = Gateway(family_compositions(), tokenizers, model_contexts(placement.values()), scheduler, "upscaled", Limits(max_tokens=40))
    server, port = create_server(gateway, "127.0.0.1:0")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield eft_pb2_grpc.EFTServiceStub(channel), channel, worker_objects, scheduler
    channel.close()
    server.stop(grace=None)
    scheduler.close()
    stop_workers()


def ask(messages, composition="upscaled", mode=OFF, k=0, weights=None, **sampling) -> eft_pb2.GenerateRequest:
    sampling.setdefault("temperature", 0.0)
    sampling.setdefault("max_tokens", 12)
    return eft_pb2.GenerateRequest(
        composition=composition,
        weights=weights or {},
        messages=eft_pb2.ChatMessages(messages=[eft_pb2.ChatMessage(**m) for m in messages]),
        sampling=eft_pb2.Sampling(**sampling),
        speculation=eft_pb2.Speculation(mode=mode, k=k),
        return_options=eft_pb2.ReturnOptions(token_ids=True, logprobs=True, rewards=True),
    )


def sessions_held(worker_objects) -> int:
    return sum(w.info().sessions for w in worker_objects)


@pytest.mark.parametrize("composition", ["upscaled", "mixed"])
@pytest.mark.parametrize("mode, k", [(OFF, 0), (FIXED, 1), (FIXED, 4), (ADAPTIVE, 2)])
def test_greedy_equals_the_reference_loop(service, oracle, quick_family, composition, mode, k):
    stub, _, worker_objects, _ = service
    for messages in questions(quick_family, n=3):
        reply = stub.Generate(ask(messages, composition, mode, k), timeout=60)
        expected = oracle.generate(composition, messages, SamplingParams(temperature=0, max_tokens=12))
        assert list(reply.token_ids) == expected.generation.tokens and reply.text == expected.text
        assert reply.usage.completion_tokens == len(expected.generation.tokens)
        assert reply.usage.prompt_tokens == len(expected.prompt_ids["large-base"])
        assert len(reply.rewards) == len(reply.token_ids) and all(len(r.values) == len(oracle.compositions[composition].deltas) for r in reply.rewards)
        if mode != ADAPTIVE:  # the tuner may measure that drafting does not pay here and choose k = 0
            assert (reply.stats.drafted > 0) == (mode == FIXED)
    assert sessions_held(worker_objects) == 0


def test_zero_weights_give_the_base_models_own_output(service, oracle, quick_family):
    stub, _, _, _ = service
    messages = questions(quick_family)[1]
    reply = stub.Generate(ask(messages, weights={"chat": 0.0}, mode=FIXED, k=3), timeout=60)
    assert list(reply.token_ids) == oracle.generate("large-base", messages, SamplingParams(temperature=0, max_tokens=12)).generation.tokens


def test_ignore_eos_goes_on_to_max_tokens(service, oracle, quick_family, tokenizers):
    stub, _, worker_objects, _ = service
    messages = questions(quick_family)[0]
    ended = oracle.generate("upscaled", messages, SamplingParams(temperature=0, max_tokens=30)).generation.tokens
    eos = tokenizers["large-base"].eos_token_id
    assert ended[-1] == eos  # the question's answer ends with EOS well before 30 tokens
    reply = stub.Generate(ask(messages, max_tokens=len(ended) + 5, ignore_eos=True, mode=FIXED, k=3), timeout=60)
    assert reply.finish_reason == eft_pb2.FINISH_REASON_LENGTH and len(reply.token_ids) == len(ended) + 5
    assert list(reply.token_ids[: len(ended)]) == ended
    assert sessions_held(worker_objects) == 0


def test_stream_chunks_add_up_to_the_unary_reply(service, quick_family):
    stub, _, _, _ = service
    request = ask(questions(quick_family)[0], mode=FIXED, k=3, max_tokens=20)
    unary = stub.Generate(request, timeout=60)
    chunks = list(stub.GenerateStream(request, timeout=60))
    assert "".join(c.text for c in chunks) == unary.text
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    assert all(not c.finish_reason for c in chunks[:-1]) and chunks[-1].finish_reason == unary.finish_reason
    assert chunks[-1].usage == unary.usage and len(chunks) > 1


def test_seeded_sampling_is_the_same_alone_or_among_8_concurrent(service, quick_family):
    stub, _, _, _ = service
    asked = questions(quick_family)
    mine = ask(asked[0], mode=FIXED, k=2, temperature=1.0, seed=1234, max_tokens=16)
    alone = stub.Generate(mine, timeout=60)
    replies = {}

    def call(i):
        request = mine if i == 0 else ask(asked[i % 4], temperature=1.0, max_tokens=5 + i)
        replies[i] = stub.Generate(request, timeout=60)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert list(replies[0].token_ids) == list(alone.token_ids)


def test_16_concurrent_streams_complete_correctly(service, oracle, quick_family):
    stub, _, worker_objects, _ = service
    asked = questions(quick_family)
    expected = [oracle.generate("upscaled", asked[i % 4], SamplingParams(temperature=0, max_tokens=12)).generation.tokens for i in range(4)]
    results = {}

    def call(i):
        chunks = list(stub.GenerateStream(ask(asked[i % 4], mode=(OFF, FIXED, ADAPTIVE)[i % 3], k=3), timeout=60))
        results[i] = [t for c in chunks for t in c.token_ids]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(results[i] == expected[i % 4] for i in range(16))
    assert sessions_held(worker_objects) == 0


def test_client_cancellation_mid_stream_releases_every_session(service, quick_family):
    stub, _, worker_objects, _ = service
    call = stub.GenerateStream(ask(questions(quick_family)[0], "mixed", FIXED, 2, max_tokens=40, stop=["never-said"]), timeout=60)
    first = next(call)
    assert first.token_ids
    call.cancel()
    _wait_until(lambda: sessions_held(worker_objects) == 0)


def test_deadline_expiry_is_deadline_exceeded_and_releases_every_session(service, quick_family):
    stub, _, worker_objects, scheduler = service
    with worker_objects[0].lock:  # stall the base worker: the request cannot finish in time
        with pytest.raises(grpc.RpcError) as error:
            stub.Generate(ask(questions(quick_family)[0], max_tokens=40), timeout=0.5)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert scheduler.counts == (1, 0)  # admitted, and stuck in a step
    _wait_until(lambda: scheduler.counts == (0, 0) and sessions_held(worker_objects) == 0)


def test_stop_strings_end_the_text_before_them(service, oracle, quick_family):
    stub, _, _, _ = service
    messages = questions(quick_family)[0]
    full = stub.Generate(ask(messages), timeout=60).text
    stop = full.split()[2]
    reply = stub.Generate(ask(messages, stop=[stop]), timeout=60)
    assert reply.text == full[: full.index(stop)] and reply.finish_reason == eft_pb2.FINISH_REASON_STOP


@pytest.mark.parametrize(
    "request_, code, field",
    [
        (eft_pb2.GenerateRequest(composition="nope", text="hi"), grpc.StatusCode.NOT_FOUND, "composition"),
        (eft_pb2.GenerateRequest(text="hi", sampling=eft_pb2.Sampling(top_p=2.0)), grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p"),
        (eft_pb2.GenerateRequest(text="hi", sampling=eft_pb2.Sampling(temperature=-1.0)), grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
        (eft_pb2.GenerateRequest(text="hi", weights={"chatt": 1.0}), grpc.StatusCode.INVALID_ARGUMENT, "weights['chatt']"),
        (eft_pb2.GenerateRequest(text="hi", weights={"chat": math.nan}), grpc.StatusCode.INVALID_ARGUMENT, "weights['chat']"),
        (eft_pb2.GenerateRequest(composition="large-base", text="hi", speculation=eft_pb2.Speculation(mode=FIXED)), grpc.StatusCode.INVALID_ARGUMENT, "speculation.mode"),
        (eft_pb2.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (eft_pb2.GenerateRequest(text="hi", sampling=eft_pb2.Sampling(max_tokens=41)), grpc.StatusCode.RESOURCE_EXHAUSTED, "sampling.max_tokens"),
        (eft_pb2.GenerateRequest(messages=eft_pb2.ChatMessages(messages=[eft_pb2.ChatMessage(role="robot", content="x")])), grpc.StatusCode.INVALID_ARGUMENT, "messages[0].role"),
        (eft_pb2.GenerateRequest(text="hi", sampling=eft_pb2.Sampling(max_tokens=0)), grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens"),
        (eft_pb2.GenerateRequest(text="hi", return_options=eft_pb2.ReturnOptions(logprobs=True, top_logprobs=21)), grpc.StatusCode.INVALID_ARGUMENT, "return_options.top_logprobs"),
        (eft_pb2.GenerateRequest(text="hi", return_options=eft_pb2.ReturnOptions(top_logprobs=2)), grpc.StatusCode.INVALID_ARGUMENT, "return_options.top_logprobs"),
    ],
)
def test_bad_requests_get_precise_statuses(service, request_, code, field):
    stub, _, _, _ = service
    for method in (stub.Generate, lambda r, timeout: list(stub.GenerateStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as error:
            method(request_, timeout=30)
        assert error.value.code() == code and field in error.value.details(), error.value.details()
    assert stub.Generate(eft_pb2.GenerateRequest(text="the capital of", sampling=eft_pb2.Sampling(max_tokens=2)), timeout=30).usage.completion_tokens >= 1


def test_health_reflection_and_compositions(service):
    stub, channel, _, _ = service
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    reply = next(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert "eft.v1.EFTService" in {s.name for s in reply.list_services_response.service}
    listing = stub.ListCompositions(eft_pb2.ListCompositionsRequest(), timeout=10)
    by_name = {c.name: c for c in listing.compositions}
    assert listing.default_composition == "upscaled" and by_name["upscaled"].drafter == "small-tuned"
    assert [(d.name, d.weight) for d in by_name["mixed"].deltas] == [("chat", 0.5), ("safe", 0.5)]


def _wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_a_request_must_fit_every_models_context_and_an_unset_max_tokens_takes_what_fits(service, tokenizers):
    stub, _, worker_objects, _ = service
    context = worker_objects[0].models["large-base"].max_sequence_length  # 512: the family's context, from the worker
    prompt = " ".join(["the capital of"] * ((context - 20) // 3))  # plain text: every model sees the same tokens
    used = len(tokenizers["large-base"](prompt, add_special_tokens=False)["input_ids"]) + 1  # and <bos>
    room = context - used
    too_long = eft_pb2.GenerateRequest(text=prompt, sampling=eft_pb2.Sampling(temperature=0, max_tokens=room + 1))
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(too_long, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"sampling.max_tokens: {used} prompt tokens + max_tokens {room + 1} is over the context of model 'large-base' ({context} positions; at most {room} new tokens fit)" in error.value.details()
    # beside short requests that speculate, the longest one runs up to the last position
    fits = eft_pb2.GenerateRequest(text=prompt, sampling=eft_pb2.Sampling(temperature=0, ignore_eos=True), speculation=eft_pb2.Speculation(mode=FIXED, k=4))
    replies = {}
    threads = [threading.Thread(target=lambda i=i: replies.__setitem__(i, stub.Generate(fits if i == 0 else ask([{"role": "user", "content": "what is the capital of"}], mode=FIXED, k=4), timeout=60))) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert replies[0].usage.completion_tokens == room and replies[0].finish_reason == eft_pb2.FINISH_REASON_LENGTH
    assert all(replies[i].usage.completion_tokens >= 1 for i in (1, 2, 3))
    whole = eft_pb2.GenerateRequest(text=" ".join(["the capital of"] * (context // 3 + 1)), sampling=eft_pb2.Sampling(max_tokens=1))
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(whole, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "fill the context of model" in error.value.details() and "prompt" in error.value.details()
    assert sessions_held(worker_objects) == 0


SCORED = eft_pb2.ReturnOptions(token_ids=True, logprobs=True, prompt_logprobs=True, top_logprobs=4)


def check_scored_prompt(stub, oracle, request: eft_pb2.GenerateRequest) -> float:
    """``request`` (a text or token-id prompt, greedy, SCORED) over Generate and
    GenerateStream: the prompt's logprobs, its top logprobs and the generated tokens' equal
    the oracle's one uncached forward over prompt + output; the stream's first message
    carries the prompt's, and with max_tokens 0 the same prompt is scored, nothing made.
    Returns the largest difference from the oracle."""
    reply = stub.Generate(request, timeout=60)
    prompt, tokens = list(reply.prompt_token_ids), list(reply.token_ids)
    assert prompt == oracle.score(request.composition, request.text or TokenPrompt(tuple(request.tokens.ids)))[0] and tokens
    _, expected, scores = scored_prompt(oracle, request.composition, TokenPrompt(tuple(prompt + tokens)))
    assert len(reply.prompt_logprobs) == len(prompt) - 1 and reply.prompt_logprobs == pytest.approx(expected[: len(prompt) - 1], abs=1e-5)
    assert reply.logprobs == pytest.approx(expected[len(prompt) - 1 :], abs=1e-5)
    tops = [*reply.prompt_top_logprobs, *reply.top_logprobs]
    assert len(tops) == len(prompt) - 1 + len(tokens)
    for position, top in enumerate(tops):
        values, ids = scores[position].topk(request.return_options.top_logprobs)
        assert list(top.token_ids) == ids.tolist() and list(top.logprobs) == pytest.approx(values.tolist(), abs=1e-5)
    assert [t.token_ids[0] for t in reply.top_logprobs] == tokens  # greedy: the most probable
    chunks = list(stub.GenerateStream(request, timeout=60))  # a batch of other sizes: the same values up to float rounding
    assert [len(c.prompt_logprobs) for c in chunks] == [len(prompt) - 1] + [0] * (len(chunks) - 1) and list(chunks[0].prompt_token_ids) == prompt
    assert list(chunks[0].prompt_logprobs) == pytest.approx(expected[: len(prompt) - 1], abs=1e-5)
    assert [t for c in chunks for t in c.token_ids] == tokens and [t.token_ids for c in chunks for t in c.top_logprobs] == [t.token_ids for t in reply.top_logprobs]
    only = eft_pb2.GenerateRequest()
    only.CopyFrom(request)
    only.sampling.max_tokens = 0
    scored = stub.Generate(only, timeout=60)
    assert (list(scored.token_ids), scored.text, scored.finish_reason, scored.usage.completion_tokens) == ([], "", eft_pb2.FINISH_REASON_LENGTH, 0)
    assert list(scored.prompt_logprobs) == pytest.approx(expected[: len(prompt) - 1], abs=1e-5)
    assert [t.token_ids for t in scored.prompt_top_logprobs] == [t.token_ids for t in reply.prompt_top_logprobs]
    return max(abs(a - b) for a, b in zip([*reply.prompt_logprobs, *reply.logprobs], expected))


@pytest.mark.parametrize("composition", ["upscaled", "mixed"])
@pytest.mark.parametrize("mode, k", [(OFF, 0), (FIXED, 3)])
def test_prompt_logprobs_and_top_logprobs_equal_the_oracles_scoring(service, oracle, quick_family, composition, mode, k):
    stub, _, worker_objects, _ = service
    entity = quick_family.world().entities[3]
    text = eft_pb2.GenerateRequest(composition=composition, text=f"the capital of {entity} is", sampling=eft_pb2.Sampling(temperature=0, max_tokens=6), speculation=eft_pb2.Speculation(mode=mode, k=k), return_options=SCORED)
    check_scored_prompt(stub, oracle, text)
    ids = oracle.score(composition, f"the animal of {entity} is")[0]
    tokens = eft_pb2.GenerateRequest(composition=composition, tokens=eft_pb2.TokenIds(ids=ids), sampling=eft_pb2.Sampling(temperature=0, max_tokens=4), return_options=SCORED)
    check_scored_prompt(stub, oracle, tokens)
    assert sessions_held(worker_objects) == 0


def test_model_logprobs_over_grpc_whole_and_streamed(service, oracle, quick_family):
    stub, _, _, _ = service
    messages = questions(quick_family)[0]
    request = ask(messages, "mixed", FIXED, 3)
    request.return_options.model_logprobs, request.return_options.top_logprobs = True, 2
    reply = stub.Generate(request, timeout=60)
    want = oracle.generate("mixed", messages, SamplingParams(temperature=0, max_tokens=12), keep_logits=True)
    assert list(reply.token_ids) == want.generation.tokens and len(reply.model_logprobs) == len(reply.token_ids)
    vocab = oracle.vocab_sizes["mixed"]
    for token, view, logits in zip(reply.token_ids, reply.model_logprobs, want.step_logits):
        assert set(view.models) == set(oracle.compositions["mixed"].scored_models)
        for model, seen in view.models.items():
            own = torch.log_softmax(logits[model][:vocab].float(), dim=-1)
            assert seen.logprob == pytest.approx(float(own[token]), abs=1e-5) and list(seen.top.token_ids) == own.topk(2).indices.tolist()
    streamed = [v for chunk in stub.GenerateStream(request, timeout=60) for v in chunk.model_logprobs]
    assert [sorted(v.models) for v in streamed] == [sorted(v.models) for v in reply.model_logprobs]
