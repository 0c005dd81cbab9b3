import pytest
from transformers import AutoTokenizer

from services.family.evaluate import open_engine
from services.worker.client import GrpcWorkerClient, InProcessWorkerClient
from services.worker.server import create_server
from services.worker.worker import ModelWorker, load_hosted_model


@pytest.fixture(scope="module")
def oracle(quick_family):
    return open_engine(quick_family)


@pytest.fixture(scope="module")
def tokenizers(quick_family):
    return {name: AutoTokenizer.from_pretrained(quick_family.model_path(name)) for name in quick_family.manifest["models"]}


@pytest.fixture(scope="module", params=["in-process", "grpc"])
def workers(request, quick_family):
    """A base worker (large models) and a pair worker (small models), as the cluster places them."""
    load = lambda names: ModelWorker([load_hosted_model(n, quick_family.model_path(n)) for n in names])  # noqa: E731
    base, pair = load(["large-base", "large-tuned"]), load(["small-base", "small-tuned", "small-safe"])
    servers = []
    if request.param == "in-process":
        clients = {w: InProcessWorkerClient(w) for w in (base, pair)}
    else:
        clients = {}
        for w in (base, pair):
            server, port = create_server(w, "127.0.0.1:0")
            servers.append(server)
            clients[w] = GrpcWorkerClient(f"127.0.0.1:{port}")
    placement = {name: clients[w] for w in (base, pair) for name in w.models}
    yield placement, (base, pair)
    for server in servers:
        server.stop(grace=None)
