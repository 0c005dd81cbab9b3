"""The served stack on the byte-level BPE family (ChatML, multilingual text, base models
without a chat template, padded vocabularies): greedy equality with the oracle, logprobs,
and the text invariant on every path (gRPC stream and unary, HTTP stream and whole, with
speculation off and on): the text a client assembles is the full decode of the tokens it
was given, cut before the first stop string, and usage counts exactly those tokens."""

import grpc
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from eft_core import SamplingParams
from services.coordinator.engine import Engine, pools_of
from services.coordinator.scheduler import Scheduler
from services.family.compositions import family_compositions
from services.family.evaluate import open_engine
from services.gateway.gateway import Gateway, Limits
from services.gateway.openai_api import create_app, start_http_server
from services.gateway.server import create_server
from services.gateway.text import REPLACEMENT
from services.pb.eft.v1 import eft_pb2, eft_pb2_grpc
from services.worker.client import model_contexts
from tests.services.coordinator.helpers import start_workers
from tests.services.gateway.test_service import SCORED, check_scored_prompt, sessions_held
from tests.services.gateway.test_text import expected

OFF, FIXED = eft_pb2.SPECULATION_MODE_OFF, eft_pb2.SPECULATION_MODE_FIXED
PROMPT = "à Zürich , le capital est"
MAX_TOKENS = 24
QUESTIONS = [[{"role": "user", "content": f"what is the {a} of {e} ? 東京 😀"}] for e, a in [("vobi", "capital"), ("Москва", "color"), ("café", "animal")]]


@pytest.fixture(scope="module")
def bpe_oracle(bpe_family):
    return open_engine(bpe_family)


@pytest.fixture(scope="module")
def stack(bpe_family, bpe_oracle):
    placement, worker_objects, stop_workers = start_workers(bpe_family, "grpc")
    tokenizers = {n: AutoTokenizer.from_pretrained(bpe_family.model_path(n)) for n in bpe_family.manifest["models"]}
    scheduler = Scheduler(Engine(pools_of(placement), bpe_oracle.vocab_sizes), max_running=16, max_waiting=64)
    gateway = Gateway(family_compositions(), tokenizers, model_contexts(placement.values()), scheduler, "upscaled", Limits(max_tokens=64))
    grpc_server, grpc_port = create_server(gateway, "127.0.0.1:0")
    http, http_port = start_http_server(create_app(gateway), "127.0.0.1", 0)
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0, timeout=60)
    yield eft_pb2_grpc.EFTServiceStub(channel), client, tokenizers["large-base"], worker_objects
    channel.close()
    http.should_exit = True
    grpc_server.stop(grace=None)
    scheduler.close()
    stop_workers()


def chat(messages, composition="upscaled", mode=OFF, k=0, **sampling) -> eft_pb2.GenerateRequest:
    sampling.setdefault("max_tokens", 16)
    request = eft_pb2.GenerateRequest(composition=composition, sampling=eft_pb2.Sampling(**sampling), speculation=eft_pb2.Speculation(mode=mode, k=k), return_options=eft_pb2.ReturnOptions(token_ids=True, logprobs=True))
    request.messages.messages.extend(eft_pb2.ChatMessage(**m) for m in messages)
    return request


@pytest.mark.parametrize("composition", ["upscaled", "mixed"])
@pytest.mark.parametrize("mode, k", [(OFF, 0), (FIXED, 3)])
def test_greedy_tokens_text_and_logprobs_equal_the_oracle(stack, bpe_oracle, composition, mode, k):
    stub, _, _, worker_objects = stack
    for messages in QUESTIONS:
        reply = stub.Generate(chat(messages, composition, mode, k, temperature=0, ignore_eos=True), timeout=60)
        want = bpe_oracle.generate(composition, messages, SamplingParams(temperature=0, max_tokens=16), ignore_eos=True)
        assert list(reply.token_ids) == want.generation.tokens and reply.text == want.text
        assert reply.logprobs == pytest.approx(want.generation.logprobs, abs=1e-5)
        assert reply.usage.prompt_tokens == len(want.prompt_ids["large-base"])  # the base's own rendering: no chat template
    assert sessions_held(worker_objects) == 0


# --- the text invariant on every path ---------------------------------------------------------


def grpc_stream(stack, seed, stop, speculation):
    chunks = list(stack[0].GenerateStream(_plain(seed, stop, speculation), timeout=60))
    return "".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids], chunks[-1].usage.completion_tokens


def grpc_unary(stack, seed, stop, speculation):
    reply = stack[0].Generate(_plain(seed, stop, speculation), timeout=60)
    return reply.text, list(reply.token_ids), reply.usage.completion_tokens


def http_stream(stack, seed, stop, speculation):
    events = list(stack[1].completions.create(stream=True, stream_options={"include_usage": True}, **_body(seed, stop, speculation)))
    text = "".join(e.choices[0].text for e in events if e.choices)
    tokens = [t for e in events if e.choices for t in e.choices[0].model_extra["token_ids"]]
    return text, tokens, events[-1].usage.completion_tokens


def http_whole(stack, seed, stop, speculation):
    reply = stack[1].completions.create(**_body(seed, stop, speculation))
    return reply.choices[0].text, reply.choices[0].model_extra["token_ids"], reply.usage.completion_tokens


def _plain(seed, stop, speculation) -> eft_pb2.GenerateRequest:
    mode = eft_pb2.Speculation(mode=FIXED, k=speculation) if speculation else eft_pb2.Speculation(mode=OFF)
    sampling = eft_pb2.Sampling(temperature=1.5, top_p=_top_p(seed), seed=seed, max_tokens=MAX_TOKENS, ignore_eos=True, stop=stop)
    return eft_pb2.GenerateRequest(text=PROMPT, sampling=sampling, speculation=mode, return_options=eft_pb2.ReturnOptions(token_ids=True))


def _body(seed, stop, speculation) -> dict:
    extra = {"speculation": speculation or "off", "ignore_eos": True, "return_token_ids": True}
    return dict(model="upscaled", prompt=PROMPT, temperature=1.5, top_p=_top_p(seed), seed=seed, max_tokens=MAX_TOKENS, stop=stop or None, extra_body=extra)


def _top_p(seed: int) -> float:
    """Odd seeds sample from a nucleus: top-p's candidate path, and drafters' sparse q."""
    return 0.8 if seed % 2 else 1.0


PATHS = {"grpc-stream": grpc_stream, "grpc-unary": grpc_unary, "http-stream": http_stream, "http-whole": http_whole}
_references: dict = {}


def reference(stack, seed, speculation) -> list[int]:
    """The request's tokens without stop strings (seeded: the same with any stop)."""
    if (seed, speculation) not in _references:
        text, tokens, count = grpc_unary(stack, seed, [], speculation)
        assert len(tokens) == count == MAX_TOKENS and text == stack[2].decode(tokens, skip_special_tokens=True)
        _references[seed, speculation] = tokens
    return _references[seed, speculation]


@pytest.mark.parametrize("speculation", [0, 3], ids=["speculation-off", "speculation-k3"])
@pytest.mark.parametrize("path", sorted(PATHS))
@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(seed=st.integers(0, 11), spans=st.lists(st.tuples(st.integers(0, 200), st.integers(1, 8)), max_size=3), extra=st.lists(st.text(min_size=1, max_size=2), max_size=1))
def test_streamed_text_is_the_decode_of_the_tokens_cut_at_the_first_stop(stack, path, speculation, seed, spans, extra):
    tokenizer = stack[2]
    tokens = reference(stack, seed, speculation)
    full = tokenizer.decode(tokens, skip_special_tokens=True)
    stop = [s for s in [full[a % max(1, len(full)) :][:n] for a, n in spans] + extra if s and REPLACEMENT not in s]  # spans: may cover several tokens
    text, kept_tokens, completion_tokens = PATHS[path](stack, seed, stop, speculation)
    want_text, kept = expected(tokenizer, tokens, stop)
    assert (text, kept_tokens, completion_tokens) == (want_text, tokens[:kept], kept)


def test_the_sampled_texts_split_characters_over_tokens(stack):
    """What the invariant above was checked on: outputs whose prefixes end in half characters."""
    tokenizer, split = stack[2], 0
    for seed in range(12):
        for speculation in (0, 3):
            tokens = reference(stack, seed, speculation)
            split += any(tokenizer.decode(tokens[:n]).endswith(REPLACEMENT) for n in range(len(tokens)))
    assert split >= 12, split


@pytest.mark.parametrize("composition", ["upscaled", "mixed"])
def test_prompt_logprobs_of_multilingual_text_equal_the_oracles_scoring(stack, bpe_oracle, composition):
    stub, _, _, worker_objects = stack
    request = eft_pb2.GenerateRequest(composition=composition, text=PROMPT + " 東京 😀", sampling=eft_pb2.Sampling(temperature=0, max_tokens=8, ignore_eos=True), speculation=eft_pb2.Speculation(mode=FIXED, k=3), return_options=SCORED)
    assert check_scored_prompt(stub, bpe_oracle, request) <= 1e-5
    assert sessions_held(worker_objects) == 0


def test_prompt_logprobs_of_a_chat_each_model_renders_differently_are_refused_by_name(stack):
    """The family's base models have no chat template: the tuned ones' ChatML prompt is not
    theirs, so no one prompt's tokens can be scored."""
    stub, _, _, _ = stack
    request = chat(QUESTIONS[0], temperature=0)
    request.return_options.prompt_logprobs = True
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith("return_options.prompt_logprobs: needs every model of 'upscaled' to see the same prompt tokens, but this prompt renders differently for ['small-tuned'] than for 'large-base' (their chat templates or BOS): send token ids"), error.value.details()
