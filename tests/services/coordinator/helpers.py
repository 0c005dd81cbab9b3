"""Building engine requests from chat messages, as the gateway will."""

import torch

from services.coordinator.engine import Engine, EngineRequest
from services.family.compositions import family_compositions
from services.prompts import render_prompt
from services.worker.client import GrpcWorkerClient, InProcessWorkerClient
from services.worker.server import create_server
from services.worker.worker import ModelWorker, load_hosted_model

COMPOSITIONS = family_compositions()


def questions(quick_family, n=4):
    world = quick_family.world()
    return [[{"role": "user", "content": f"what is the {a} of {e} ?"}] for e in world.entities[:n] for a in ("capital", "animal")][:n]


def make_request(i, composition, messages, tokenizers, params, weights=None, draft_k=0) -> EngineRequest:
    chosen = COMPOSITIONS[composition]
    prompts = {m: render_prompt(tokenizers[m], messages) for m in chosen.models}
    return EngineRequest(f"r{i}", chosen, prompts, params, chosen.weights(weights), draft_k)


def run(engine: Engine, requests: list[EngineRequest], joining: list[EngineRequest] = ()) -> None:
    joining = list(joining)
    steps = 0
    while not all(r.done for r in requests) or joining:
        if joining and steps == 2:  # requests join a running batch
            requests += joining
            joining = []
        engine.step(requests)
        steps += 1
    engine.wait_released()


def start_workers(family, transport: str):
    """A base worker (large models) and a pair worker (small models), as the cluster places
    them, in process or behind gRPC servers on 127.0.0.1. Returns the model -> client
    placement, the workers, and a function that stops the servers."""
    load = lambda names: ModelWorker([load_hosted_model(n, family.model_path(n)) for n in names])  # noqa: E731
    workers = (load(["large-base", "large-tuned"]), load(["small-base", "small-tuned", "small-safe"]))
    servers, clients = [], {}
    for worker in workers:
        if transport == "in-process":
            clients[worker] = InProcessWorkerClient(worker)
        else:
            server, port = create_server(worker, "127.0.0.1:0")
            servers.append(server)
            clients[worker] = GrpcWorkerClient(f"127.0.0.1:{port}")
    placement = {name: clients[w] for w in workers for name in w.models}
    return placement, workers, lambda: [s.stop(grace=None) for s in servers]


def scored_prompt(oracle, composition: str, prompt):
    """The oracle's scoring of ``prompt``: its tokens (as the base renders them), each
    token's EFT logprob after the first, and the EFT logprobs at every position."""
    ids, scores = oracle.score(composition, prompt)
    following = torch.tensor(ids[1:], dtype=torch.long)[:, None]
    return ids, scores[:-1].gather(1, following)[:, 0].tolist(), scores
