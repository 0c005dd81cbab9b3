"""Fuzzed requests against a live EFTService (gateway, scheduler, engine, workers behind real
gRPC servers on 127.0.0.1): every answer is OK or a specific client status, never INTERNAL
or UNKNOWN; afterwards the server is still SERVING and no worker holds a session."""

import collections
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.coordinator.engine import Engine, pools_of
from services.coordinator.scheduler import Scheduler
from services.family.compositions import family_compositions
from services.gateway.gateway import Gateway, Limits
from services.gateway.server import create_server
from services.pb.eft.v1 import eft_pb2
from services.worker.client import model_contexts
from tests.services.coordinator.helpers import start_workers

CLIENT_STATUSES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}
EXAMPLES = 500


@pytest.fixture(scope="module")
def live(quick_family, oracle, tokenizers):
    placement, workers, stop_workers = start_workers(quick_family, "grpc")
    scheduler = Scheduler(Engine(pools_of(placement), oracle.vocab_sizes), max_running=8, max_waiting=64)
    limits = Limits(max_prompt_tokens=48, max_tokens=6, default_max_tokens=3, max_stop_strings=4)
    server, port = create_server(Gateway(family_compositions(), tokenizers, model_contexts(placement.values()), scheduler, "upscaled", limits), "127.0.0.1:0")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield channel, workers
    channel.close()
    server.stop(grace=None)
    scheduler.close()
    stop_workers()


names = st.sampled_from(["upscaled", "mixed", "large-base", "small-tuned", "", "nope", "UPSCALED", "x" * 300, "upscaled\x00"])
floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
doubles = st.floats(allow_nan=True, allow_infinity=True)
int32 = st.one_of(st.integers(-3, 8), st.integers(-(2**31), 2**31 - 1))
text = st.one_of(st.text(max_size=40), st.sampled_from(["what is the capital of zeme ?", "", " ", "<eos>", "\u00e9\u4e2d\U0001f600", "x " * 400]))
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "", "wizard"]), "content": text}), max_size=3)


@st.composite
def generate_requests(draw) -> bytes:
    """Requests sane but for a few fields (none, one, or all) drawn wild."""
    wild = set(draw(st.one_of(st.just(()), st.lists(st.sampled_from(WILD_FIELDS), max_size=2), st.just(WILD_FIELDS))))
    pick = lambda field, sane, crazy: draw(crazy if field in wild else sane)  # noqa: E731
    request = eft_pb2.GenerateRequest(composition=pick("composition", st.sampled_from(["upscaled", "mixed", ""]), names))
    for name, weight in pick("weights", st.dictionaries(st.just("chat"), st.floats(-2, 2), max_size=1), st.dictionaries(st.sampled_from(["chat", "safe", "nope", ""]), doubles, max_size=3)).items():
        request.weights[name] = weight
    if draw(st.booleans()):
        request.text = pick("prompt", st.just("the capital of zeme is"), text)
    else:
        request.messages.SetInParent()
        sane = st.just([{"role": "user", "content": "what is the capital of zeme ?"}])
        request.messages.messages.extend(eft_pb2.ChatMessage(**m) for m in pick("prompt", sane, messages))
    sampling = request.sampling
    sampling.temperature = pick("temperature", st.sampled_from([0.0, 0.7, 1.0]), floats)
    if draw(st.booleans()):
        sampling.top_p = pick("top_p", st.floats(0.1, 1.0), floats)
    sampling.seed = draw(st.integers(0, 2**64 - 1))
    sampling.top_k = pick("top_k", st.integers(0, 50), int32)
    sampling.max_tokens = pick("max_tokens", st.integers(0, 6), int32)
    sampling.conservative_top_p, sampling.ignore_eos = draw(st.booleans()), draw(st.booleans())
    sampling.stop.extend(pick("stop", st.lists(st.sampled_from([".", "is"]), max_size=2), st.lists(text, max_size=6)))
    request.speculation.mode = pick("speculation", st.integers(0, 3), st.integers(-2, 6))
    request.speculation.k = pick("speculation", st.integers(0, 4), int32)
    return request.SerializeToString()


WILD_FIELDS = ("composition", "weights", "prompt", "temperature", "top_p", "top_k", "max_tokens", "stop", "speculation")


def raw_bytes() -> st.SearchStrategy[bytes]:
    """Bytes that are not a valid request: noise, truncations, a text field that is not UTF-8."""
    not_utf8 = st.binary(min_size=1, max_size=20).filter(lambda b: not _is_utf8(b)).map(lambda b: b"\x1a" + bytes([len(b)]) + b)
    truncated = generate_requests().filter(lambda b: len(b) > 2).map(lambda b: b[:-1])
    return st.one_of(st.binary(max_size=64), not_utf8, truncated)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_fuzzed_requests_get_client_statuses_and_harm_nothing(live):
    channel, workers = live
    unary = channel.unary_unary("/eft.v1.EFTService/Generate")
    stream = channel.unary_stream("/eft.v1.EFTService/GenerateStream")
    seen = collections.Counter()

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(payload=st.one_of(generate_requests(), raw_bytes()), streaming=st.booleans())
    def one(payload, streaming):
        try:
            if streaming:
                list(stream(payload, timeout=60))
            else:
                unary(payload, timeout=60)
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as error:
            code, details = error.code(), error.details()
        seen[code.name] += 1
        assert code in CLIENT_STATUSES, (code, details, payload[:200])
        if code != grpc.StatusCode.OK:
            assert details and ":" in details, details  # names the field

    one()
    print(f"fuzzed {sum(seen.values())} requests: {dict(seen)}")
    assert sum(seen.values()) >= EXAMPLES and seen["OK"] > 0 and seen["INVALID_ARGUMENT"] > 0
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="eft.v1.EFTService"), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    deadline = time.monotonic() + 10
    while sum(w.info().sessions for w in workers):
        assert time.monotonic() < deadline, [w.info() for w in workers]
        time.sleep(0.1)
