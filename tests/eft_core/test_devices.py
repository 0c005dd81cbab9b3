"""eft_core computes on its inputs' device: nothing it creates lands on the default device.

No GPU here, so the default device is set to ``meta`` while the inputs stay on the CPU: a
tensor eft_core made without naming a device would be a meta tensor, and mixing it with
the inputs (or reading it) fails. On a GPU the same slip would mix CPU and CUDA tensors.
The results must equal those computed without the default set (seeded: bit for bit)."""

import torch

from eft_core import Composition, Delta, SamplingBatch, SamplingParams, eft_logprobs, implicit_rewards
from eft_core.sampling import sample_from_probs, sampling_probs, seeded_generator
from eft_core.speculative import DraftProbs, accept_greedy_ragged, accept_ragged

MIXED = Composition("mixed", "base", (Delta("chat", "tuned", "reference"), Delta("safe", "safe", "reference")), "tuned")
PARAMS = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0.7, top_p=0.8, seed=1),
    SamplingParams(temperature=1.0, top_k=5, seed=2),
    SamplingParams(temperature=1.3, top_p=0.9, conservative_top_p=True, seed=3),
    SamplingParams(temperature=1.0),
]


def decide(logits: dict[str, torch.Tensor], drafts: list[list[int]], q: torch.Tensor, seed: int):
    """One decide as the engine makes it: combine, filter, accept, rewards."""
    torch.manual_seed(seed)  # the unseeded rows' draws
    rows = [i for i, d in enumerate(drafts) for _ in range(len(d) + 1)]
    weights = torch.tensor([[1.0, 0.5]] * len(rows), device="cpu")  # the caller's tensors: on the CPU by name
    target = eft_logprobs(logits, MIXED, weights, 40)[:, 0]
    batch = SamplingBatch.from_params(PARAMS, {i: seeded_generator(seed + i) for i, p in enumerate(PARAMS) if p.seed is not None})
    nucleus = torch.log_softmax(logits["tuned"][:, 0, :40].float(), dim=-1)
    p = sampling_probs(target, batch.rows_of(rows), nucleus)
    emitted = accept_ragged(drafts, p, DraftProbs.dense(q, sum(drafts, [])), batch.generators)
    greedy = accept_greedy_ragged(drafts, target.argmax(dim=-1))
    tokens = torch.tensor([t[0] for t in emitted], device="cpu")
    first = torch.tensor([sum(len(d) + 1 for d in drafts[:i]) for i in range(len(drafts))], device="cpu")
    rewards = implicit_rewards({m: x[first] for m, x in logits.items()}, MIXED, tokens[:, None], 40)
    plain = sample_from_probs(p, {0: seeded_generator(seed)})
    return emitted, greedy, rewards, plain, target


def test_the_decide_path_creates_nothing_on_the_default_device():
    generator = torch.Generator().manual_seed(0)
    drafts = [[3, 4], [], [7, 7, 1], [2], [9]]
    positions = sum(len(d) + 1 for d in drafts)
    logits = {m: 3 * torch.randn(positions, 1, 48, generator=generator) for m in ("base", "tuned", "reference", "safe")}  # padded past the 40 real tokens
    q = torch.softmax(torch.randn(sum(map(len, drafts)), 40, generator=generator), dim=-1)
    expected = decide(logits, drafts, q, seed=11)
    with torch.device("meta"):
        got = decide(logits, drafts, q, seed=11)
    assert got[0] == expected[0] and got[1] == expected[1]
    for a, b in zip(got[2:], expected[2:]):
        assert a.device.type == "cpu" and torch.equal(a, b)
