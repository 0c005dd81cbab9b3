"""One deployment of the application on a local Ray cluster (127.0.0.1) for every test of
this package: Ray's fixed ports allow one cluster per test session."""

import grpc
import pytest

from cluster.config import ServeConfig, demo_config
from cluster.launcher import start_local, stop_local
from services.pb.eft.v1 import eft_pb2_grpc


@pytest.fixture(scope="package")
def deployment(quick_family):
    """The demo layout, except that large-tuned runs tensor-parallel on 2 ranks in its own group
    and the pair group has two replicas."""
    config = demo_config(quick_family.path).model_dump()
    config["worker_groups"][0]["models"] = ["large-base"]
    config["worker_groups"][1]["replicas"] = 2
    config["worker_groups"].append({"name": "tuned-tp", "models": ["large-tuned"], "tp": 2})
    config.update(grpc_port=0, http_port=0, metrics_port=0)
    deployed = start_local(ServeConfig.model_validate(config), num_cpus=2)
    yield deployed
    stop_local()


@pytest.fixture(scope="package")
def stub(deployment):
    with grpc.insecure_channel(deployment.address) as channel:
        yield eft_pb2_grpc.EFTServiceStub(channel), channel


