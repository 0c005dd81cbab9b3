"""The Ray Serve application on a local Ray cluster (127.0.0.1) (deployed once: conftest.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from eft_core import SamplingParams
from services.pb.eft.v1 import eft_pb2
from services.security import HEALTHZ_PATH
from tests.cluster.helpers import chat, sessions_held, wait_for

EFT = str(Path(sys.executable).parent / "eft")


def test_health_and_reflection(stub):
    _, channel = stub
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="eft.v1.EFTService"), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    reply = next(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert "eft.v1.EFTService" in {s.name for s in reply.list_services_response.service}


def test_the_gateway_answers_kuberays_healthz_on_the_http_and_scrape_ports(deployment):
    """What KubeRay polls on the port named serve (the chart's rule 3 and 4, tests/helm)."""
    for base in (deployment.http, deployment.metrics.removesuffix("/metrics")):
        reply = requests.get(base + HEALTHZ_PATH, timeout=10)
        assert (reply.status_code, reply.text) == (200, "success")


@pytest.mark.parametrize("mode", [eft_pb2.SPECULATION_MODE_OFF, eft_pb2.SPECULATION_MODE_FIXED])
def test_greedy_through_ray_serve_equals_the_reference_loop(stub, oracle, quick_family, mode):
    service, _ = stub
    question = f"what is the capital of {quick_family.world().entities[0]} ?"
    request = chat(question, temperature=0.0, max_tokens=12)
    request.speculation.mode, request.speculation.k = mode, 4
    reply = service.Generate(request, timeout=60)
    expected = oracle.generate("upscaled", [{"role": "user", "content": question}], SamplingParams(temperature=0, max_tokens=12))
    assert list(reply.token_ids) == expected.generation.tokens and reply.text == expected.text


def test_a_tensor_parallel_worker_group_serves_like_one_process(stub, oracle, quick_family):
    service, _ = stub
    question = f"what is the color of {quick_family.world().entities[3]} ?"
    request = chat(question, temperature=0.0, max_tokens=12)
    request.composition = "large-tuned"
    reply = service.Generate(request, timeout=60)
    expected = oracle.generate("large-tuned", [{"role": "user", "content": question}], SamplingParams(temperature=0, max_tokens=12))
    assert list(reply.token_ids) == expected.generation.tokens


def test_cancelled_stream_releases_the_worker_sessions(stub, deployment, quick_family):
    service, _ = stub
    call = service.GenerateStream(chat(f"what is the animal of {quick_family.world().entities[1]} ?", temperature=1.0, max_tokens=40), timeout=60)
    assert next(call).token_ids
    call.cancel()  # released by the cancellation, well before the workers' idle timeout (10 s here) would
    wait_for(lambda: sessions_held(deployment) == 0, 5, "sessions released after cancel")


def test_requests_spread_over_the_replicas_of_a_worker_group(stub, deployment, quick_family):
    wait_for(lambda: len(deployment.worker_addresses()["pair"]) == 2, 60, "the second pair replica")  # it may still be loading
    service, _ = stub
    streams = [service.GenerateStream(chat(f"what is the animal of {e} ?", temperature=1.0, max_tokens=40, ignore_eos=True), timeout=60) for e in quick_family.world().entities[:2]]
    for stream in streams:
        assert next(stream).token_ids
    pair_sessions = deployment.worker_sessions()["pair"]
    for stream in streams:
        stream.cancel()
    assert len(pair_sessions) == 2 and all(n > 0 for n in pair_sessions), pair_sessions  # one request on each replica


def test_eft_generate_and_compositions_talk_to_the_server(deployment, quick_family):
    question = f"what is the color of {quick_family.world().entities[2]} ?"
    env = {**os.environ, "COLUMNS": "250"}
    result = subprocess.run([EFT, "generate", question, "--address", deployment.address, "--temperature", "0", "--max-tokens", "8", "--speculate", "3", "--json"], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert {"text", "token_ids", "finish_reason", "usage", "stats"} <= set(reply)
    assert reply["usage"]["completion_tokens"] == len(reply["token_ids"]) > 0 and reply["stats"]["draft_tokens"] > 0
    listing = subprocess.run([EFT, "compositions", "--address", deployment.address], capture_output=True, text=True, timeout=60)
    assert "upscaled: large-base + 1 x (small-tuned - small-base) [chat]; drafter small-tuned  (default)" in listing.stdout
    bad = subprocess.run([EFT, "generate", "hi", "--address", deployment.address, "--composition", "nope"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr and "Traceback" not in bad.stderr


def test_rays_own_token_auth_stays_on(deployment):
    """Ray 2.60 turns its control-plane token auth on for a local cluster; nothing of ours
    turns it off: the GCS refuses a client without the token."""
    import grpc
    import ray
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    assert is_token_auth_enabled()
    with grpc.insecure_channel(ray.get_runtime_context().gcs_address) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId")(b"", timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, refused.value
