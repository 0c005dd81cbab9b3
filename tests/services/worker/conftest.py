import pytest

from services.worker.api import WorkerLimits
from services.worker.client import GrpcWorkerClient, InProcessWorkerClient
from services.worker.server import create_server
from services.worker.worker import ModelWorker, load_hosted_model


@pytest.fixture(scope="session")
def hosted(quick_family):
    """The quick family's large base (vocabulary padded) and small tuned model, loaded once."""
    return [
        load_hosted_model("large", quick_family.model_path("large-base")),
        load_hosted_model("small", quick_family.model_path("small-tuned")),
    ]


@pytest.fixture
def worker(hosted):
    return ModelWorker(hosted, WorkerLimits(max_sessions=16, max_cached_tokens=400))


@pytest.fixture(params=["grpc", "in-process"])
def client(request, worker):
    """The same worker behind each transport; gRPC through a real server on 127.0.0.1:0."""
    if request.param == "in-process":
        yield InProcessWorkerClient(worker)
        return
    server, port = create_server(worker, "127.0.0.1:0")
    client = GrpcWorkerClient(f"127.0.0.1:{port}", timeout=30)
    yield client
    client.close()
    server.stop(grace=None)
