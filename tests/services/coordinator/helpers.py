"""Building engine requests from chat messages, as the gateway will."""

from services.coordinator.engine import Engine, EngineRequest
from services.family.compositions import family_compositions
from services.prompts import render_prompt

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
