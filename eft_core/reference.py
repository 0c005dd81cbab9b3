"""The reference decoding loop: obviously correct EFT generation for one request.

It is the oracle the distributed system is tested against, so it trades speed for
plainness: one request, every model called once per position, nothing batched.

A **logits source** is any callable that, given the tokens generated so far, returns one
model's logits for the next token (``[vocab_m]``). It renders its own prompt: each model
may see the prompt in its own template (DESIGN.md 2.3); generated tokens are shared.

With ``draft_k > 0`` the loop decodes speculatively (DESIGN.md 2.1): the drafter proposes
up to k tokens, every scored model is evaluated at the k + 1 positions, and
``accept_drafts`` keeps a prefix plus one recovered or bonus token. The output distribution
is the same as without speculation; greedy output is the same token for token.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from eft_core.combine import eft_logprobs, implicit_rewards, real_vocab_logits
from eft_core.composition import Composition
from eft_core.errors import InvalidArgumentError, require
from eft_core.sampling import SamplingBatch, SamplingParams, sample, sample_from_probs, sampling_probs
from eft_core.speculative import accept_drafts
from eft_core.stats import SpeculationStats

LogitsSource = Callable[[Sequence[int]], torch.Tensor]  # generated tokens -> next-token logits [vocab_m]


@dataclass
class Generation:
    """What one request produced."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # each token's log p_eft (temperature 1, unfiltered)
    rewards: list[list[float]] = field(default_factory=list)  # per token, the implicit reward of each delta
    finish_reason: str | None = None  # "stop" (a stop token was emitted) or "length" (max_tokens)
    stats: SpeculationStats = field(default_factory=SpeculationStats)


@dataclass(frozen=True)
class _Scored:
    """All scored models' logits at one position, and what follows from them."""

    logits: dict[str, torch.Tensor]  # model -> [1, 1, vocab]
    target: torch.Tensor  # [vocab] EFT log-probabilities
    nucleus: torch.Tensor  # [vocab] log-probabilities of the composition's nucleus model


def generate(
    sources: Mapping[str, LogitsSource],
    composition: Composition,
    params: SamplingParams,
    *,
    weights: Mapping[str, float] | None = None,
    vocab_size: int | None = None,
    draft_k: int = 0,
) -> Generation:
    """Generate one completion; ``weights`` overrides delta weights by delta name."""
    require(isinstance(draft_k, int) and draft_k >= 0, "draft_k", f"must be an integer >= 0, got {draft_k!r}")
    needed = composition.models if draft_k else composition.scored_models
    for model in needed:
        if model not in sources:
            raise InvalidArgumentError(f"no logits source for model {model!r}", field=f"sources[{model!r}]")
    loop = _Loop(sources, composition, params, composition.weights(weights), vocab_size)
    while loop.out.finish_reason is None:
        loop.speculative_step(draft_k) if draft_k else loop.step()
    return loop.out


class _Loop:
    def __init__(self, sources, composition, params, weights, vocab_size):
        self.sources, self.composition, self.params = sources, composition, params
        self.weights, self.vocab_size = weights, vocab_size
        self.batch = SamplingBatch.from_params([params])
        self.out = Generation()

    def step(self) -> None:
        """One token sampled from the EFT distribution."""
        scored = self.score(self.out.tokens)
        token, _ = sample(scored.target[None], self.batch, scored.nucleus[None])
        self.emit(int(token), scored)

    def speculative_step(self, draft_k: int) -> None:
        """Draft up to k tokens, score k + 1 positions, keep the accepted prefix plus one."""
        k = min(draft_k, self.params.max_tokens - len(self.out.tokens) - 1)
        drafts, draft_probs = self.draft(k)
        scored = [self.score(self.out.tokens + drafts[:j]) for j in range(k + 1)]
        target_probs = sampling_probs(
            torch.stack([s.target for s in scored]),
            self.batch.rows_of([0] * (k + 1)),
            torch.stack([s.nucleus for s in scored]),
        )
        result = accept_drafts(
            torch.tensor([drafts], dtype=torch.int64).reshape(1, k),
            torch.tensor([k]),
            draft_probs.reshape(1, k, target_probs.shape[-1]),
            target_probs[None],
            self.batch.generators,
        )
        self.out.stats.observe_draft(k, int(result.num_accepted[0]))
        for position, token in enumerate(result.emitted(0)):
            if self.out.finish_reason is None:
                self.emit(token, scored[position])

    def draft(self, k: int) -> tuple[list[int], torch.Tensor]:  # k tokens, q [k, vocab]
        drafter = self.composition.drafter_model
        drafts, probs = [], []
        for _ in range(k):
            logits = self.logits_of(drafter, self.out.tokens + drafts)
            q = sampling_probs(torch.log_softmax(logits[0, 0].float(), dim=-1)[None], self.batch)
            drafts.append(int(sample_from_probs(q, self.batch.generators)[0]))
            probs.append(q[0])
        return drafts, torch.stack(probs) if probs else torch.zeros(0, 0)

    def score(self, generated: list[int]) -> _Scored:
        logits = {m: self.logits_of(m, generated) for m in self.composition.scored_models}
        target = eft_logprobs(logits, self.composition, self.weights, self.vocab_size)[0, 0]
        nucleus = torch.log_softmax(logits[self.composition.nucleus_model][0, 0].float(), dim=-1)
        return _Scored(logits, target, nucleus)

    def logits_of(self, model: str, generated: list[int]) -> torch.Tensor:  # [1, 1, vocab]
        logits = torch.as_tensor(self.sources[model](list(generated)))
        require(logits.dim() == 1, f"sources[{model!r}]", f"must return next-token logits [vocab], got shape {tuple(logits.shape)}")
        return real_vocab_logits({model: logits[None, None]}, self.vocab_size)[model]

    def emit(self, token: int, scored: _Scored) -> None:
        out = self.out
        out.tokens.append(token)
        out.logprobs.append(float(scored.target[token]))
        reward = implicit_rewards(scored.logits, self.composition, torch.tensor([[token]]), self.vocab_size)
        out.rewards.append(reward[0, 0].tolist())
        if token in self.params.stop_token_ids:
            out.finish_reason = "stop"
        elif len(out.tokens) >= self.params.max_tokens:
            out.finish_reason = "length"
