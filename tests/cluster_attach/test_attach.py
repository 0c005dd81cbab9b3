"""`eft serve --address auto` attaches to a Ray cluster it did not start (`ray start --head`
on this machine), serves from it, and on Ctrl-C deletes its application and leaves the
cluster running. Its own package: one Ray cluster at a time, and tests/cluster's is stopped
by the time this runs."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import yaml

from cluster.app import APP_NAME
from cluster.config import demo_config
from eft_core import SamplingParams
from services.pb.eft.v1 import eft_pb2, eft_pb2_grpc
from tests.cluster.helpers import free_ports

BIN = Path(sys.executable).parent
ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # loopback only (ENVIRONMENT.md)
READY_SECONDS = 300


def _ray(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True, timeout=120, env=ENV)


@pytest.fixture
def ray_head():
    (port,) = free_ports(1)
    started = _ray("start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats")
    assert started.returncode == 0, started.stderr[-2000:]
    yield port
    _ray("stop")


def _wait_for(process: subprocess.Popen, text: str, seconds: float) -> list[str]:
    lines, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        lines.append(line)
        if text in line:
            return lines
    pytest.fail(f"no {text!r} within {seconds} s; output:\n{''.join(lines)[-3000:]}")


def test_serve_attaches_to_a_running_cluster_and_leaves_it_running(ray_head, quick_family, oracle, tmp_path):
    grpc_port, http_port, metrics_port = free_ports(3)
    config = demo_config(quick_family.path, grpc_port, http_port, metrics_port).model_dump(mode="json")
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    serving = subprocess.Popen([str(BIN / "eft"), "serve", "--config", str(tmp_path / "serve.yaml"), "--address", "auto"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        lines = _wait_for(serving, "serving; Ctrl-C stops", READY_SECONDS)
        assert any("the Ray cluster at auto" in line for line in lines)
        question = [{"role": "user", "content": "what is the capital of " + quick_family.world().entities[0] + " ?"}]
        request = eft_pb2.GenerateRequest(composition="upscaled", sampling=eft_pb2.Sampling(temperature=0.0, max_tokens=8))
        request.messages.messages.extend(eft_pb2.ChatMessage(**m) for m in question)
        request.return_options.token_ids = True
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            reply = eft_pb2_grpc.EFTServiceStub(channel).Generate(request, timeout=120)
        assert list(reply.token_ids) == oracle.generate("upscaled", question, SamplingParams(temperature=0, max_tokens=8)).generation.tokens
        serving.send_signal(signal.SIGINT)
        assert serving.wait(timeout=120) == 0
    finally:
        if serving.poll() is None:
            serving.kill()
    applications = subprocess.run(  # the cluster outlives the application, which is gone from it
        [sys.executable, "-c", "import ray; from ray import serve; ray.init(address='auto', log_to_driver=False); print(sorted(serve.status().applications))"],
        capture_output=True, text=True, timeout=120, env=ENV,
    )
    assert applications.returncode == 0 and APP_NAME not in applications.stdout.strip().splitlines()[-1], applications.stdout + applications.stderr[-2000:]
