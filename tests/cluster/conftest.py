"""One deployment of the application on a local Ray cluster (127.0.0.1) for every test of
this package: Ray's fixed ports allow one cluster per test session."""

import grpc
import pytest

from cluster.config import ServeConfig, demo_config
from cluster.launcher import start_local
from services.pb.eft.v1 import eft_pb2_grpc
from tests.cluster.helpers import IDLE_TIMEOUT_S, MAX_RUNNING, MAX_WAITING, free_ports


@pytest.fixture(scope="package")
def deployment(quick_family):
    """The demo layout, except that large-tuned runs tensor-parallel on 2 ranks in its own group,
    the pair group has two replicas, workers free sessions idle for IDLE_TIMEOUT_S, and the
    scheduler runs MAX_RUNNING requests with MAX_WAITING queued. The public ports
    are fixed (free when chosen): a restarted gateway comes back on the same ones."""
    config = demo_config(quick_family.path).model_dump()
    config["worker_groups"][0]["models"] = ["large-base"]
    config["worker_groups"][1]["replicas"] = 2
    config["worker_groups"].append({"name": "tuned-tp", "models": ["large-tuned"], "tp": 2})
    for group in config["worker_groups"]:
        group["session_idle_timeout_s"] = IDLE_TIMEOUT_S
    config["limits"] = {"max_running": MAX_RUNNING, "max_waiting": MAX_WAITING}  # the load test's 32 clients overflow it
    config.update(zip(["grpc_port", "http_port", "metrics_port"], free_ports(3)))
    deployed = start_local(ServeConfig.model_validate(config), num_cpus=2)
    yield deployed
    deployed.stop()


@pytest.fixture(scope="package")
def stub(deployment):
    with grpc.insecure_channel(deployment.address) as channel:
        yield eft_pb2_grpc.EFTServiceStub(channel), channel


