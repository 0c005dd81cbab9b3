"""The OpenAI-compatible HTTP API, called by the official `openai` client, and the metrics
it and the gRPC path record: one process, workers behind real gRPC servers on 127.0.0.1."""

import collections
import importlib.metadata
import json
import time

import grpc
import openai
import pytest
import requests
import torch
from prometheus_client.parser import text_string_to_metric_families

from eft_core import SamplingParams, eft_logprobs
from services.coordinator.engine import Engine, pools_of
from services.coordinator.scheduler import Scheduler
from services.family.compositions import family_compositions
from services.gateway.gateway import Gateway, Limits
from services.gateway.openai_api import CHAT_UNSUPPORTED, UNSUPPORTED, create_app, start_http_server
from services.gateway.server import create_server
from services.metrics import ServingMetrics, scheduler_state, worker_state
from services.security import HEALTHZ_PATH
from services.pb.eft.v1 import eft_pb2, eft_pb2_grpc
from services.prompts import TokenPrompt
from services.worker.client import model_contexts
from tests.services.coordinator.helpers import questions, scored_prompt, start_workers
from tests.services.gateway.test_service import sessions_held

MAX_REQUEST_BYTES = 64 << 10


@pytest.fixture(scope="module")
def server(quick_family, oracle, tokenizers):
    placement, worker_objects, stop_workers = start_workers(quick_family, "grpc")
    metrics = ServingMetrics()
    scheduler = Scheduler(Engine(pools_of(placement), oracle.vocab_sizes, metrics=metrics), max_running=8, max_waiting=2)
    gateway = Gateway(family_compositions(), tokenizers, model_contexts(placement.values()), scheduler, "upscaled", Limits(max_tokens=40, max_request_bytes=MAX_REQUEST_BYTES), metrics)
    metrics.add_state(scheduler_state(scheduler))
    metrics.add_state(worker_state(lambda: {"pair": placement["small-base"], "base": placement["large-base"]}, lambda client: None))
    http, port = start_http_server(create_app(gateway), "127.0.0.1", 0)
    grpc_server, grpc_port = create_server(gateway, "127.0.0.1:0")
    metrics_server, metrics_port = metrics.serve("127.0.0.1", 0, {HEALTHZ_PATH: gateway.healthz})
    yield f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{metrics_port}/metrics", worker_objects
    http.should_exit = True
    metrics_server.shutdown()
    grpc_server.stop(grace=None)
    scheduler.close()
    stop_workers()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def expected(oracle, composition, messages, max_tokens=12):
    return oracle.generate(composition, messages, SamplingParams(temperature=0, max_tokens=max_tokens))


def test_models_lists_the_compositions(client):
    assert {m.id for m in client.models.list()} == set(family_compositions())


@pytest.mark.parametrize("speculation", ["off", 3, "auto"])
def test_chat_completion_greedy_equals_the_grpc_path_and_the_reference(server, client, oracle, quick_family, speculation):
    messages = questions(quick_family)[0]
    reply = client.chat.completions.create(model="upscaled", messages=messages, temperature=0, max_tokens=12, extra_body={"speculation": speculation, "return_token_ids": True})
    with grpc.insecure_channel(server[1]) as channel:
        request = eft_pb2.GenerateRequest(composition="upscaled", sampling=eft_pb2.Sampling(temperature=0, max_tokens=12), return_options=eft_pb2.ReturnOptions(token_ids=True))
        request.messages.messages.extend(eft_pb2.ChatMessage(**m) for m in messages)
        via_grpc = eft_pb2_grpc.EFTServiceStub(channel).Generate(request, timeout=60)
    want = expected(oracle, "upscaled", messages)
    assert reply.choices[0].message.content == via_grpc.text == want.text
    assert reply.choices[0].model_extra["token_ids"] == list(via_grpc.token_ids) == want.generation.tokens
    assert reply.model_extra["prompt_token_ids"] == want.prompt_ids["large-base"]  # vLLM's places
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens == len(want.generation.tokens)
    assert reply.usage.prompt_tokens == len(want.prompt_ids["large-base"]) and reply.object == "chat.completion"
    assert (reply.model_extra["eft"]["draft_tokens"] > 0) == (speculation != "off")


def test_streamed_chat_adds_up_to_the_whole_reply(client, server, oracle, quick_family):
    messages = questions(quick_family)[1]
    stream = client.chat.completions.create(model="mixed", messages=messages, temperature=0, max_tokens=12, stream=True, stream_options={"include_usage": True}, extra_body={"weights": {"chat": 1.0, "safe": 0.5}})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    want = oracle.generate("mixed", messages, SamplingParams(temperature=0, max_tokens=12), weights={"chat": 1.0, "safe": 0.5})
    assert text == want.text and chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == len(want.generation.tokens) and not chunks[-1].choices
    assert sessions_held(server[3]) == 0


def test_completions_streamed_and_not_with_logprobs_and_rewards(client, oracle, quick_family):
    prompt = f"the capital of {quick_family.world().entities[2]} is"
    whole = client.completions.create(model="upscaled", prompt=prompt, temperature=0, max_tokens=8, logprobs=1, extra_body={"implicit_rewards": True, "return_token_ids": True, "speculation": 2})
    want = oracle.generate("upscaled", prompt, SamplingParams(temperature=0, max_tokens=8))
    assert whole.choices[0].text == want.text and whole.object == "text_completion"
    assert whole.choices[0].logprobs.token_logprobs == pytest.approx(want.generation.logprobs, abs=1e-4)
    assert len(whole.model_extra["eft"]["implicit_rewards"]) == len(want.generation.tokens)
    streamed = list(client.completions.create(model="upscaled", prompt=prompt, temperature=0, max_tokens=8, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == want.text


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "composition"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "sampling.temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "temprature": 0.5}, 400, "temprature"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "hi"}], "weights": {"chat": 1e9}}, 400, "weights['chat']"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}, 400, "sampling.max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 33}, 400, "n"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2, "implicit_rewards": True}, 400, "n"),
        ({"messages": []}, 400, "messages"),
    ],
)
def test_bad_requests_get_openai_shaped_errors(server, body, status, param):
    reply = requests.post(server[0] + "/v1/chat/completions", json=body, timeout=30)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] in ("invalid_request_error", "not_found_error")


def test_return_token_ids_puts_them_where_vllm_does(client, oracle, quick_family):
    """``token_ids`` on each choice (each stream chunk's: its own tokens), ``prompt_token_ids``
    on a completion's choice or at a chat reply's top level, in a stream's first chunk only;
    nothing of them without return_token_ids."""
    prompt, messages = "the capital of", questions(quick_family)[0]
    params = dict(model="upscaled", temperature=0, max_tokens=8, extra_body={"return_token_ids": True})
    plain = oracle.generate("upscaled", prompt, SamplingParams(temperature=0, max_tokens=8))
    chat = expected(oracle, "upscaled", messages, max_tokens=8)
    whole = client.completions.create(prompt=prompt, **params).choices[0].model_extra
    assert (whole["token_ids"], whole["prompt_token_ids"]) == (plain.generation.tokens, plain.prompt_ids["large-base"])
    events = list(client.completions.create(prompt=prompt, stream=True, **params))
    assert [t for e in events for t in e.choices[0].model_extra["token_ids"]] == plain.generation.tokens
    assert [e.choices[0].model_extra.get("prompt_token_ids") for e in events] == [plain.prompt_ids["large-base"]] + [None] * (len(events) - 1)
    reply = client.chat.completions.create(messages=messages, **params)
    assert (reply.choices[0].model_extra["token_ids"], reply.model_extra["prompt_token_ids"]) == (chat.generation.tokens, chat.prompt_ids["large-base"])
    events = list(client.chat.completions.create(messages=messages, stream=True, **params))
    assert [e.model_extra.get("prompt_token_ids") for e in events] == [chat.prompt_ids["large-base"]] + [None] * (len(events) - 1)
    assert [t for e in events[1:] for t in e.choices[0].model_extra["token_ids"]] == chat.generation.tokens
    bare = client.chat.completions.create(messages=messages, model="upscaled", temperature=0, max_tokens=8)
    assert "token_ids" not in bare.choices[0].model_extra and "prompt_token_ids" not in bare.model_extra


def test_models_tokenize_detokenize_and_version_as_vllm_serves_them(server, client, oracle, quick_family):
    """GET /v1/models/{id} (its models and deltas under eft), /tokenize (a prompt or a chat,
    as the base model sees it: the ids a generation gets), /detokenize, /version."""
    url = server[0]
    card = client.models.retrieve("mixed").model_extra["eft"]
    mixed = family_compositions()["mixed"]
    assert card == {"base": mixed.base, "deltas": [{"name": d.name, "tuned": d.tuned, "reference": d.reference, "weight": d.weight} for d in mixed.deltas], "drafter": mixed.drafter_model}
    assert len(card["deltas"]) == 2 and card["base"] == "large-base"
    missing = requests.get(url + "/v1/models/nope", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
    messages = questions(quick_family)[0]
    for prompt, key in [("the capital of", "prompt"), (messages, "messages")]:
        want = oracle.generate("upscaled", prompt, SamplingParams(temperature=0, max_tokens=1)).prompt_ids["large-base"]
        counted = requests.post(url + "/tokenize", json={"model": "upscaled", key: prompt}, timeout=30).json()
        assert (counted["tokens"], counted["count"]) == (want, len(want)) and counted["max_model_len"] > 0
    both = requests.post(url + "/tokenize", json={"prompt": "x", "messages": messages}, timeout=30)
    assert both.status_code == 400 and both.json()["error"]["param"] == "prompt"
    ids = requests.post(url + "/tokenize", json={"prompt": "the capital of"}, timeout=30).json()["tokens"]
    assert requests.post(url + "/detokenize", json={"tokens": ids[1:]}, timeout=30).json() == {"prompt": "the capital of"}  # past the BOS
    outside = requests.post(url + "/detokenize", json={"tokens": [ids[1], 10**6]}, timeout=30)
    assert outside.status_code == 400 and outside.json()["error"]["param"] == "tokens[1]"
    assert requests.get(url + "/version", timeout=30).json() == {"version": importlib.metadata.version("eft-serve")}


def test_a_prompt_of_token_ids_is_given_to_every_model_as_it_is(server, client, oracle):
    """vLLM's token-id prompts (a list of ints, or a list holding one): the same greedy
    tokens as the text they tokenize to, over HTTP and gRPC; ids checked against the
    vocabulary (and the wire's range) and the prompt limit, each refusal naming the id."""
    ids = oracle.generate("upscaled", "the capital of", SamplingParams(temperature=0, max_tokens=1)).prompt_ids["large-base"]
    want = oracle.generate("upscaled", TokenPrompt(tuple(ids)), SamplingParams(temperature=0, max_tokens=8))
    assert want.generation.tokens == oracle.generate("upscaled", "the capital of", SamplingParams(temperature=0, max_tokens=8)).generation.tokens
    for prompt in (ids, [ids]):
        reply = client.completions.create(model="upscaled", prompt=prompt, temperature=0, max_tokens=8, extra_body={"return_token_ids": True})
        assert (reply.choices[0].model_extra["token_ids"], reply.choices[0].model_extra["prompt_token_ids"]) == (want.generation.tokens, ids)
    with grpc.insecure_channel(server[1]) as channel:
        request = eft_pb2.GenerateRequest(composition="upscaled", tokens=eft_pb2.TokenIds(ids=ids), sampling=eft_pb2.Sampling(temperature=0, max_tokens=8), return_options=eft_pb2.ReturnOptions(token_ids=True))
        assert list(eft_pb2_grpc.EFTServiceStub(channel).Generate(request, timeout=60).token_ids) == want.generation.tokens
    for prompt, status, param in [([ids[0], 10**6], 400, "tokens.ids[1]"), ([-1], 400, "tokens.ids[0]"), ([], 400, "prompt"), (ids * 1000, 400, "tokens.ids"), ([ids] * 33, 400, "prompt")]:
        reply = requests.post(server[0] + "/v1/completions", json={"model": "upscaled", "prompt": prompt, "max_tokens": 2}, timeout=30)
        assert (reply.status_code, reply.json()["error"]["param"]) == (status, param), reply.text


@pytest.mark.parametrize("stream", [False, True])
def test_n_samples_are_requests_of_their_own_seeded_seed_plus_i(client, oracle, quick_family, stream):
    """n choices, choice i the same as the request alone with seed + i, streamed interleaved
    under their indices; usage counts the prompt once and every choice's tokens; greedy n
    gives n equal choices."""
    messages = questions(quick_family)[0]
    alone = [client.chat.completions.create(model="upscaled", messages=messages, temperature=1.0, seed=7 + i, max_tokens=10, extra_body={"return_token_ids": True}) for i in range(3)]
    wants = [a.choices[0].model_extra["token_ids"] for a in alone]
    prompt = oracle.generate("upscaled", messages, SamplingParams(temperature=0, max_tokens=1)).prompt_ids["large-base"]
    params = dict(model="upscaled", messages=messages, temperature=1.0, seed=7, max_tokens=10, n=3, extra_body={"return_token_ids": True})
    if stream:
        events = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **params))
        tokens = {i: [t for e in events for c in e.choices if c.index == i for t in (c.model_extra or {}).get("token_ids", [])] for i in range(3)}
        finished = sorted(c.index for e in events for c in e.choices if c.finish_reason)
        usage = events[-1].usage
    else:
        reply = client.chat.completions.create(**params)
        tokens = {c.index: c.model_extra["token_ids"] for c in reply.choices}
        finished, usage = sorted(c.index for c in reply.choices if c.finish_reason), reply.usage
    assert tokens == dict(enumerate(wants)) and finished == [0, 1, 2]
    assert len({tuple(t) for t in tokens.values()}) > 1  # distinct seeds, distinct samples
    assert usage.prompt_tokens == len(prompt) and usage.completion_tokens == sum(map(len, wants))
    greedy = client.chat.completions.create(model="upscaled", messages=messages, temperature=0, max_tokens=10, n=2)
    assert [c.index for c in greedy.choices] == [0, 1] and greedy.choices[0].message.content == greedy.choices[1].message.content


ASKING = {  # each UNSUPPORTED field with a value that asks for what EFT Serve does not do
    "best_of": 3, "suffix": " end", "presence_penalty": 0.5, "frequency_penalty": -1, "logit_bias": {"5": 10},
    "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto", "functions": [{"name": "f"}], "function_call": "auto",
    "parallel_tool_calls": "yes", "response_format": {"type": "json_object"}, "audio": {"voice": "alloy"}, "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"}, "reasoning_effort": "high", "verbosity": "low", "web_search_options": {}, "service_tier": "flex",
    "store": True, "metadata": {"run": "7"},
}
CHAT_ASKING = {**ASKING, "echo": True}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_known_openai_fields_that_are_not_supported_are_refused_by_name(server, quick_family, oracle, path):
    """A field of OpenAI's API that asks for something EFT Serve does not do is a 400 saying
    so and naming it; the same field with a value that asks for nothing (what clients send
    by default) is served; a field nobody defines is a 400 naming it as unknown."""
    chat = path.endswith("chat/completions")
    base = {"model": "upscaled", "temperature": 0, "max_tokens": 6, **({"messages": questions(quick_family)[0]} if chat else {"prompt": "the capital of"})}
    unsupported = CHAT_UNSUPPORTED if chat else UNSUPPORTED
    assert set(CHAT_ASKING if chat else ASKING) == set(unsupported)
    for name, value in (CHAT_ASKING if chat else ASKING).items():
        reply = requests.post(server[0] + path, json={**base, name: value}, timeout=30)
        error = reply.json()["error"]
        assert (reply.status_code, error["param"], error["type"]) == (400, name, "invalid_request_error"), (name, reply.text)
        assert error["message"].startswith(f"{name}: not supported by EFT Serve"), error
    defaults = {name: accepted[0] for name, accepted in unsupported.items() if accepted} | {"audio": None, "parallel_tool_calls": True}
    served = requests.post(server[0] + path, json={**base, **defaults}, timeout=60)
    assert served.status_code == 200, served.text
    plain = requests.post(server[0] + path, json=base, timeout=60).json()
    answer = lambda reply: reply["choices"][0]["message"]["content"] if chat else reply["choices"][0]["text"]  # noqa: E731
    assert answer(served.json()) == answer(plain)  # the defaults change nothing
    unknown = requests.post(server[0] + path, json={**base, "temprature": 0.5}, timeout=30).json()["error"]
    assert unknown["param"] == "temprature" and unknown["message"].startswith("temprature: unknown field"), unknown


def test_the_openai_client_sees_a_refusal_naming_the_field(client, quick_family):
    with pytest.raises(openai.BadRequestError, match="tools: not supported by EFT Serve"):
        client.chat.completions.create(model="upscaled", messages=questions(quick_family)[0], tools=[{"type": "function", "function": {"name": "lookup", "parameters": {}}}])


def test_the_openai_client_raises_its_own_error_types(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="upscaled", prompt="hi", temperature=-2)


def test_not_json_is_a_400(server):
    reply = requests.post(server[0] + "/v1/completions", data=b"\xff\xfe not json", headers={"content-type": "application/json"}, timeout=30)
    assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_request_error"


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    samples = {}
    for family in text_string_to_metric_families(requests.get(url, timeout=30).text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples, name, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and all(dict(ls).get(k) == want for k, want in labels.items()))


def test_metrics_count_requests_tokens_and_drafts(server, client, quick_family):
    before = scrape(server[2])
    n = 3
    for messages in questions(quick_family, n=n):
        client.chat.completions.create(model="upscaled", messages=messages, temperature=0, max_tokens=12, extra_body={"speculation": 3, "implicit_rewards": True})
    after = scrape(server[2])
    delta = lambda name, **labels: total(after, name, **labels) - total(before, name, **labels)  # noqa: E731
    assert delta("eft_time_to_first_token_seconds_count", composition="upscaled") == n
    assert delta("eft_e2e_request_latency_seconds_count", composition="upscaled") == n
    assert delta("eft_request_queue_time_seconds_count", composition="upscaled") == n
    assert delta("eft_requests_total", code="OK") == n
    generated = delta("eft_generation_tokens_total", composition="upscaled")
    first_chunks = generated - delta("eft_inter_token_latency_seconds_count", composition="upscaled")  # tokens of each first chunk: 1 to k + 1
    assert generated > n and n <= first_chunks <= n * (3 + 1)
    assert delta("eft_implicit_reward_count", composition="upscaled", delta="chat") == generated
    drafted, accepted = delta("eft_spec_decode_num_draft_tokens_total"), delta("eft_spec_decode_num_accepted_tokens_total")
    assert 0 < accepted <= drafted and delta("eft_spec_decode_num_accepted_tokens_per_pos_total") == accepted
    assert delta("eft_worker_step_latency_seconds_count", method="extend") > 0
    assert delta("eft_logits_bytes_total", method="draft") == 12 * drafted  # greedy drafting's q: q(d), one index, one value per draft
    assert delta("eft_wire_bytes_total", composition="upscaled") == delta("eft_logits_bytes_total") > 0
    assert total(after, "eft_num_requests_running") == 0 and total(after, "eft_worker_kv_sessions") == 0
    assert total(after, "process_resident_memory_bytes") > 0


def test_errors_are_counted_by_status_code(server, client):
    before = scrape(server[0] + "/metrics")  # the HTTP port serves the same registry
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")
    after = scrape(server[0] + "/metrics")
    assert total(after, "eft_requests_total", code="NOT_FOUND") - total(before, "eft_requests_total", code="NOT_FOUND") == 1


def test_a_client_that_leaves_mid_stream_frees_its_sessions(server, quick_family):
    import time

    body = {"messages": questions(quick_family)[0], "max_tokens": 40, "temperature": 1.0, "ignore_eos": True, "stream": True}
    with requests.post(server[0] + "/v1/chat/completions", json=body, stream=True, timeout=30) as reply:
        lines = reply.iter_lines()
        first = next(line for line in lines if line)
        assert json.loads(first.removeprefix(b"data: "))["object"] == "chat.completion.chunk"
    deadline = time.monotonic() + 15
    while sessions_held(server[3]):
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_fuzzed_http_bodies_get_4xx_in_openai_shape_never_500(server):
    """The HTTP side of the fuzz test: JSON bodies sane but for wild fields, plus bodies that
    are not JSON objects. Every answer is 200 or a 4xx with OpenAI's error object."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    wild_values = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=20), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
    sane = {"model": "upscaled", "messages": [{"role": "user", "content": "what is the capital of zeme ?"}], "max_tokens": 3, "temperature": 0}
    fields = ["model", "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "n", "weights", "speculation", "top_k", "logprobs", "tools", "echo", "logit_bias", "unknown_field"]
    statuses = collections.Counter()

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(wild=st.dictionaries(st.sampled_from(fields), wild_values, max_size=3), raw=st.one_of(st.none(), st.binary(max_size=30)), path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
    def one(wild, raw, path):
        body = {**sane, **wild} if path.endswith("chat/completions") else {**{k: v for k, v in sane.items() if k != "messages"}, "prompt": "the capital of", **wild}
        reply = requests.post(server[0] + path, data=raw, headers={"content-type": "application/json"}, timeout=60) if raw is not None else requests.post(server[0] + path, json=body, timeout=60)
        statuses[reply.status_code] += 1
        assert reply.status_code in (200, 400, 404, 429), (reply.status_code, reply.text[:300], body)
        if reply.status_code != 200:
            assert set(reply.json()["error"]) >= {"message", "type", "param", "code"}

    one()
    print(f"HTTP fuzz: {dict(statuses)}")
    assert statuses[200] > 0 and statuses[400] > 0
    assert requests.get(server[0] + "/health", timeout=10).status_code == 200
    deadline = time.monotonic() + 10
    while sessions_held(server[3]):
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_kuberay_healthz_on_the_http_and_scrape_ports(server, tokenizers, oracle):
    """KubeRay labels the head pod serving when GET <serve port>/-/healthz answers 200 and
    worker pods' default probe greps "success" (Ray Serve's proxy contract); the scrape
    port answers it too, in plaintext, for a gateway whose public ports have TLS on."""
    metrics_base = server[2].removesuffix("/metrics")
    for base in (server[0], metrics_base):
        reply = requests.get(base + HEALTHZ_PATH, timeout=10)
        assert (reply.status_code, reply.text) == (200, "success")
    assert "eft_num_requests_running" in requests.get(metrics_base + "/metrics", timeout=10).text  # the scrape path is unchanged
    stopped = Scheduler(Engine({}, oracle.vocab_sizes), max_running=1, max_waiting=1)
    stopped.close()  # no scheduler loop: nothing can serve
    gateway = Gateway(family_compositions(), tokenizers, {}, stopped, "upscaled")
    metrics_server, port = gateway.metrics.serve("127.0.0.1", 0, {HEALTHZ_PATH: gateway.healthz})
    try:
        reply = requests.get(f"http://127.0.0.1:{port}{HEALTHZ_PATH}", timeout=10)
        assert reply.status_code == 503 and "success" not in reply.text
    finally:
        metrics_server.shutdown()


def test_requests_over_the_size_limit_are_refused_before_parsing(server, client, quick_family):
    big = "what is the capital of zeme ? " * 4000  # 120 kB, over 64 kB
    declared = requests.post(server[0] + "/v1/chat/completions", json={"messages": [{"role": "user", "content": big}]}, timeout=30)
    chunked = requests.post(server[0] + "/v1/completions", data=(big[i : i + 8000].encode() for i in range(0, len(big), 8000)), headers={"content-type": "application/json"}, timeout=30)
    for reply in (declared, chunked):
        assert reply.status_code == 413 and "limits.max_request_bytes" in reply.json()["error"]["message"], reply.text[:300]
    with grpc.insecure_channel(server[1]) as channel:
        service = eft_pb2_grpc.EFTServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            service.Generate(eft_pb2.GenerateRequest(text=big), timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
        assert service.Generate(eft_pb2.GenerateRequest(text="the capital of zeme is", sampling=eft_pb2.Sampling(max_tokens=2)), timeout=30).usage.completion_tokens == 2
    assert client.chat.completions.create(model="upscaled", messages=questions(quick_family)[0], max_tokens=2).usage.completion_tokens == 2


def test_streams_beyond_running_and_queued_are_refused_at_once(server, quick_family):
    """40 concurrent gRPC streams against a scheduler that runs 8 and queues 2: each stream is
    admitted or refused with RESOURCE_EXHAUSTED within a second, none waits unanswered."""
    import threading

    request = eft_pb2.GenerateRequest(sampling=eft_pb2.Sampling(temperature=1.0, max_tokens=40, ignore_eos=True))
    request.messages.messages.extend(eft_pb2.ChatMessage(**m) for m in questions(quick_family)[0])
    outcomes, lock = [], threading.Lock()

    def stream(service):
        sent = time.monotonic()
        try:
            chunks = list(service.GenerateStream(request, timeout=120))
            outcome = ("OK", chunks[-1].usage.completion_tokens)
        except grpc.RpcError as error:
            outcome = (error.code().name, error.details())
        with lock:
            outcomes.append((time.monotonic() - sent, outcome))

    with grpc.insecure_channel(server[1]) as channel:
        service = eft_pb2_grpc.EFTServiceStub(channel)
        threads = [threading.Thread(target=stream, args=(service,)) for _ in range(40)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    refused = [seconds for seconds, (code, _) in outcomes if code == "RESOURCE_EXHAUSTED"]
    served = [tokens for _, (code, tokens) in outcomes if code == "OK"]
    print(f"40 streams, 8 running + 2 queued: {len(served)} served, {len(refused)} refused, the slowest refusal after {max(refused):.3f} s")
    assert len(outcomes) == 40 and len(served) + len(refused) == 40, outcomes
    assert len(served) >= 10 and served == [40] * len(served) and max(refused) < 1.0
    assert all("max_waiting" in details for _, (code, details) in outcomes if code == "RESOURCE_EXHAUSTED")


def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_asks(server, client, oracle):
    """lm-evaluation-harness's loglikelihood request (a token-id prompt, echo, logprobs 1,
    max_tokens 1) and plain prompt scoring (text, max_tokens 0, logprobs 3): the prompt's
    text comes first; each prompt token after the first has its EFT logprob (the oracle's
    within 1e-5) and its most probable tokens; the first has none."""
    ids, expected, scores = scored_prompt(oracle, "upscaled", "the capital of the animal of")
    reply = client.completions.create(model="upscaled", prompt="the capital of the animal of", echo=True, logprobs=3, max_tokens=0)
    choice = reply.choices[0]
    assert choice.text == "the capital of the animal of" and choice.finish_reason == "length" and reply.usage.completion_tokens == 0
    logprobs = choice.logprobs
    assert logprobs.tokens == [oracle.tokenizers["large-base"].decode([t]) for t in ids] and logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-5)
    for position, top in enumerate(logprobs.top_logprobs[1:]):
        values, _ = scores[position].topk(3)
        assert sorted(top.values(), reverse=True)[:3] == pytest.approx(values.tolist(), abs=1e-5) and 3 <= len(top) <= 4  # and the prompt's own token
    assert logprobs.text_offset == sorted(logprobs.text_offset) and len(logprobs.text_offset) == len(ids)
    # lm-eval: [[ids]], max_tokens 1; the context's logprobs are [ctxlen:-1], the last is the generated token's
    body = {"model": "upscaled", "prompt": [ids], "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0, "seed": 1234}
    scored = requests.post(server[0] + "/v1/completions", json=body, timeout=60).json()["choices"][0]["logprobs"]
    assert len(scored["token_logprobs"]) == len(ids) + 1 and scored["token_logprobs"][1:-1] == pytest.approx(expected, abs=1e-5)
    greedy = [lp == max(top.values()) for lp, top in zip(scored["token_logprobs"][1:], scored["top_logprobs"][1:])]
    assert greedy[-1] and greedy[:-1] == [int(scores[i].argmax()) == t for i, t in enumerate(ids[1:])]  # lm-eval's is_greedy
    streamed = list(client.completions.create(model="upscaled", prompt="the capital of the animal of", echo=True, logprobs=3, max_tokens=4, temperature=0, stream=True))
    assert streamed[0].choices[0].text.startswith(choice.text) and streamed[0].choices[0].logprobs.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=1e-5)
    assert sum(len(c.choices[0].logprobs.tokens) for c in streamed if c.choices) == len(ids) + 4


def test_chat_top_logprobs_rank_the_eft_distribution(client, oracle, quick_family):
    """Each model renders the chat its own way: the oracle's logits at each emitted position,
    combined, rank the tokens."""
    messages = questions(quick_family)[2]
    reply = client.chat.completions.create(model="upscaled", messages=messages, temperature=0, max_tokens=6, logprobs=True, top_logprobs=5)
    want = oracle.generate("upscaled", messages, SamplingParams(temperature=0, max_tokens=6), keep_logits=True)
    content = reply.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx(want.generation.logprobs, abs=1e-5) and len(content) == len(want.step_logits)
    for entry, logits in zip(content, want.step_logits):
        target = eft_logprobs({m: x[None, None] for m, x in logits.items()}, oracle.compositions["upscaled"], vocab_size=oracle.vocab_sizes["upscaled"])[0, 0]
        values, ids = target.topk(5)
        assert [t.token for t in entry.top_logprobs] == [oracle.tokenizers["large-base"].decode([i]) for i in ids.tolist()]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(values.tolist(), abs=1e-5) and entry.top_logprobs[0].token == entry.token


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "echo": True}, "echo"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}, "return_options.top_logprobs"),
        ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "return_options.top_logprobs"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "sampling.max_tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ],
)
def test_logprob_requests_beyond_what_is_served_are_refused_by_name(server, path, body, param):
    reply = requests.post(server[0] + path, json={"model": "upscaled", **body}, timeout=30)
    assert (reply.status_code, reply.json()["error"]["param"]) == (400, param), reply.text


@pytest.mark.parametrize("stream", [False, True])
def test_several_prompts_are_choices_of_their_own_in_openais_order(client, oracle, stream):
    """Prompts p = 0, 1, 2 (text, and token ids) with n = 2: choice p * n + i is prompt p's
    sample i, each the oracle's greedy output; usage counts each prompt once."""
    texts = ["the capital of", "the animal of", "the color of"]
    ids = [oracle.score("upscaled", t)[0] for t in texts]
    greedy = [oracle.generate("upscaled", t, SamplingParams(temperature=0, max_tokens=5)) for t in texts]
    wants = [g.text for g in greedy]
    for prompt in (texts, ids):
        reply = client.completions.create(model="upscaled", prompt=prompt, temperature=0, max_tokens=5, n=2, stream=stream, stream_options={"include_usage": True} if stream else None)
        chunks = list(reply) if stream else [reply]
        texts_by_index = collections.defaultdict(str)
        for chunk in chunks:
            for choice in chunk.choices:
                texts_by_index[choice.index] += choice.text
        assert dict(texts_by_index) == {p * 2 + i: wants[p] for p in range(3) for i in range(2)}
        usage = chunks[-1].usage
        assert (usage.prompt_tokens, usage.completion_tokens) == (sum(map(len, ids)), 2 * sum(len(g.generation.tokens) for g in greedy))



@pytest.mark.parametrize("stream", [False, True])
def test_model_logprobs_give_each_models_own_view_under_eft(client, oracle, quick_family, stream):
    messages = questions(quick_family)[3]
    params = dict(model="mixed", messages=messages, temperature=0, max_tokens=6, top_logprobs=3, logprobs=True, stream=stream, extra_body={"model_logprobs": True})
    reply = client.chat.completions.create(**params)
    views = [v for chunk in reply for v in chunk.model_extra.get("eft", {}).get("model_logprobs", [])] if stream else reply.model_extra["eft"]["model_logprobs"]
    want = oracle.generate("mixed", messages, SamplingParams(temperature=0, max_tokens=6), keep_logits=True)
    assert len(views) == len(want.generation.tokens)
    vocab, tokenizer = oracle.vocab_sizes["mixed"], oracle.tokenizers["large-base"]
    for token, view, logits in zip(want.generation.tokens, views, want.step_logits):
        assert set(view) == {"large-base", "small-base", "small-tuned", "small-safe"}
        for model, seen in view.items():
            own = torch.log_softmax(logits[model][:vocab].float(), dim=-1)
            assert seen["logprob"] == pytest.approx(float(own[token]), abs=1e-5)
            assert [t["token"] for t in seen["top_logprobs"]] == [tokenizer.decode([i]) for i in own.topk(3).indices.tolist()]
    with pytest.raises(openai.BadRequestError, match="model_logprobs needs one choice"):
        client.chat.completions.create(**{**params, "stream": False, "n": 2})
