"""The worker's gRPC surface: health, reflection, limits, and the process entry point."""

import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.pb.eft.v1 import worker_pb2, worker_pb2_grpc
from eft_core import EFTError, ResourceExhaustedError
from services.worker.api import ExtendItem
from services.worker.client import GrpcWorkerClient
from services.worker.server import SERVICE_NAME, create_server
from services.worker.processes import finished_output, start_worker, wait_listening


@pytest.fixture
def address(worker):
    server, port = create_server(worker, "127.0.0.1:0")
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


def test_health_reports_serving_and_reflection_lists_the_service(address):
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        assert SERVICE_NAME == "eft.v1.ModelWorker"
        assert SERVICE_NAME in {s.name for s in reply.list_services_response.service}


def test_info_describes_the_hosted_models(address, hosted):
    info = GrpcWorkerClient(address).info()
    by_name = {m.name: m for m in info.models}
    assert by_name["large"].vocab_size == hosted[0].vocab_size > by_name["large"].tokenizer_size
    assert by_name["large"].tokenizer_fingerprint == by_name["small"].tokenizer_fingerprint
    assert (by_name["large"].dtype, by_name["large"].device, by_name["large"].tensor_parallel_size) == ("float32", "cpu", 1)
    assert (info.max_sessions, info.max_cached_tokens, info.sessions) == (16, 400, 0)


def test_raw_bad_requests_get_precise_statuses(address):
    with grpc.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.ModelWorkerStub(channel)
        cases = [
            (stub.Extend, worker_pb2.ExtendRequest(items=[worker_pb2.ExtendItem(session_id="s", model="large", token_ids=[1])], logits_dtype=42), grpc.StatusCode.INVALID_ARGUMENT, "logits_dtype"),
            (stub.Draft, worker_pb2.DraftRequest(items=[worker_pb2.DraftItem(session_id="s", model="large", token_ids=[1], num_draft=2, sampling=worker_pb2.DraftSampling(top_p=1.5))]), grpc.StatusCode.INVALID_ARGUMENT, "items[0].sampling.top_p"),
            (stub.Truncate, worker_pb2.TruncateRequest(session_id="nobody", model="large", length=0), grpc.StatusCode.NOT_FOUND, "session_id"),
        ]
        for method, request, code, field in cases:
            with pytest.raises(grpc.RpcError) as error:
                method(request, timeout=10)
            assert error.value.code() == code and field in error.value.details(), error.value.details()
        mixed = worker_pb2.DraftRequest(items=[worker_pb2.DraftItem(session_id="s", model=m, token_ids=[1], num_draft=2) for m in ("ghost", "large")])
        response = stub.Draft(mixed, timeout=10)  # one item's error, the other's drafts
        (error,) = response.errors
        assert (error.index, error.code, "items[0].model" in error.message) == (0, grpc.StatusCode.NOT_FOUND.value[0], True), error
        assert len(response.results[1].draft_tokens) == 2 and response.results[1].cache_length == 2
        assert stub.Info(worker_pb2.InfoRequest(), timeout=10).sessions == 1


def test_a_worker_with_a_token_refuses_calls_without_it(worker):
    server, port = create_server(worker, "127.0.0.1:0", token="deployment-secret")
    address = f"127.0.0.1:{port}"
    try:
        for stranger in (GrpcWorkerClient(address), GrpcWorkerClient(address, token="guess")):
            with pytest.raises(EFTError) as refused:
                stranger.extend([ExtendItem("s", "large", [1, 2, 3])])
            assert str(refused.value).startswith("UNAUTHENTICATED: "), refused.value  # the worker's status
            with pytest.raises(EFTError, match="bearer token"):
                stranger.info()
        assert worker.sessions_held() == 0  # nothing ran
        (extended,) = GrpcWorkerClient(address, token="deployment-secret").extend([ExtendItem("s", "large", [1, 2, 3])])
        assert extended.cache_length == 3
        with grpc.insecure_channel(address) as channel:  # health stays open to probes
            assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(grace=None)


def test_a_message_limit_sized_for_the_logits(worker):
    server, port = create_server(worker, "127.0.0.1:0", max_message_bytes=1000)
    try:
        client = GrpcWorkerClient(f"127.0.0.1:{port}", max_message_bytes=1000)
        with pytest.raises(ResourceExhaustedError, match="RESOURCE_EXHAUSTED"):  # 20 x 58 float32 logits > 1000 bytes
            client.extend([ExtendItem("s", "large", list(range(1, 21)), num_logits=20)])
    finally:
        server.stop(grace=None)


def test_the_worker_process_serves_a_model_folder(quick_family):
    process = start_worker("--model", f"large={quick_family.model_path('large-base')}", "--session-idle-timeout", "1")
    try:
        client = GrpcWorkerClient(wait_listening(process, 120))
        assert [m.name for m in client.info().models] == ["large"]
        assert client.extend([ExtendItem("p", "large", [1, 2, 3])])[0].logits.shape == (1, quick_family.manifest["vocab_size"])
        deadline = time.monotonic() + 10
        while client.info().sessions:  # nobody releases "p": the idle reaper does
            assert time.monotonic() < deadline
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_an_unreachable_hub_id_is_a_clear_error():
    process = start_worker("--model", "x=some-org/not-a-model", env={"HF_HUB_OFFLINE": "1"})
    output = finished_output(process, timeout=120)
    assert process.returncode == 1
    assert "not a local folder" in output and "Hugging Face hub" in output and "Traceback" not in output


def test_a_bad_idle_timeout_is_refused_before_loading():
    process = start_worker("--model", "x=/nowhere", "--session-idle-timeout", "0")
    output = finished_output(process, timeout=60)
    assert process.returncode == 2 and "--session-idle-timeout must be > 0, got 0.0" in output


def test_a_request_larger_than_the_worker_could_cache_is_refused_unread(worker):
    server, port = create_server(worker, "127.0.0.1:0")
    try:
        limit = worker.limits.largest_request_bytes()
        assert limit < 1 << 20  # this worker caches 400 tokens: not gRPC's 512 MiB
        with pytest.raises(ResourceExhaustedError, match="RESOURCE_EXHAUSTED"):
            GrpcWorkerClient(f"127.0.0.1:{port}").extend([ExtendItem("s", "large", [1] * limit)])
        assert worker.sessions_held() == 0
    finally:
        server.stop(grace=None)
