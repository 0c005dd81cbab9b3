"""Sampling: EFT log-probabilities -> the distribution a request samples from -> tokens.

Per row, in this order (as in vLLM and Hugging Face):

1. **temperature**: divide by T; T = 0 means greedy (the filters below still apply, and the
   row then takes the most probable token that survives them).
2. **top-k**: keep the k most probable tokens (k = 0: off).
3. **top-p**: keep the smallest set of most probable tokens whose mass reaches p (p = 1: off).
   With **conservative top-p** the nucleus is taken from another distribution (the small
   tuned model's, per the EFT paper) at the same temperature, and applied to the target.

Every row has its own parameters; rows with a seed draw from their own ``torch.Generator``
(``generators: dict[row, Generator]``), so a seeded request's tokens do not depend on which
other requests share its batch.
"""

import hashlib
import math
from dataclasses import dataclass, field

import torch

from eft_core.errors import require

FILTER_TEMPERATURE_WHEN_GREEDY = 1.0  # greedy rows compute their top-p (and nucleus) at T = 1


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling controls, validated on construction."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    conservative_top_p: bool = False
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = field(default=())

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        require(_is_real(self.temperature) and self.temperature >= 0, "temperature", f"must be a finite number >= 0, got {self.temperature!r}")
        require(_is_int(self.top_k) and self.top_k >= 0, "top_k", f"must be an integer >= 0 (0: off), got {self.top_k!r}")
        require(_is_real(self.top_p) and 0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p!r}")
        require(isinstance(self.conservative_top_p, bool), "conservative_top_p", f"must be a bool, got {self.conservative_top_p!r}")
        require(self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**63), "seed", f"must be an integer in [0, 2**63), got {self.seed!r}")
        require(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        for i, token in enumerate(self.stop_token_ids):
            require(_is_int(token) and token >= 0, f"stop_token_ids[{i}]", f"must be a token id >= 0, got {token!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling parameters as tensors, plus the seeded rows' generators."""

    temperature: torch.Tensor  # [rows] float32, 0 = greedy
    top_k: torch.Tensor  # [rows] int64, 0 = off
    top_p: torch.Tensor  # [rows] float32, 1 = off
    conservative: torch.Tensor  # [rows] bool
    generators: dict[int, torch.Generator]

    @staticmethod
    def from_params(params: list[SamplingParams], generators: dict[int, torch.Generator] | None = None) -> "SamplingBatch":
        """Tensors for a batch of requests; ``generators`` defaults to one per seeded row."""
        if generators is None:
            generators = {i: seeded_generator(p.seed) for i, p in enumerate(params) if p.seed is not None}
        return SamplingBatch(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32, device="cpu"),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.int64, device="cpu"),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device="cpu"),
            conservative=torch.tensor([p.conservative_top_p for p in params], dtype=torch.bool, device="cpu"),
            generators=generators,
        )

    @property
    def all_greedy(self) -> bool:
        """Every row greedy and none conservative: the best token is the argmax, whatever the
        top-k/top-p (they always keep the best token)."""
        return bool((self.temperature == 0).all()) and not bool(self.conservative.any())

    @property
    def rows(self) -> int:
        return self.temperature.shape[0]

    def rows_of(self, rows: list[int]) -> "SamplingBatch":
        """The batch restricted to some rows (renumbered 0..), e.g. the rows still drafting."""
        index = torch.tensor(rows, dtype=torch.int64, device=self.temperature.device)
        generators = {new: self.generators[old] for new, old in enumerate(rows) if old in self.generators}
        return SamplingBatch(self.temperature[index], self.top_k[index], self.top_p[index], self.conservative[index], generators)

    def to(self, device: torch.device) -> "SamplingBatch":
        """The parameters on ``device`` (where the logits are); the generators stay on the
        CPU, so a seeded request draws the same numbers on any device."""
        if self.temperature.device == device:
            return self
        return SamplingBatch(self.temperature.to(device), self.top_k.to(device), self.top_p.to(device), self.conservative.to(device), self.generators)


def seeded_generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def stream_seed(seed: int, stream: str) -> int:
    """The seed of a request's random stream named ``stream``, derived from the request's
    seed (a hash, in [0, 2**63)): a speculating request's drafter samples from
    ``stream_seed(seed, "draft")`` while its coordinator samples and accepts from ``seed``
    itself, so the two never draw the same numbers and the same seed still gives the same output."""
    digest = hashlib.blake2b(f"{seed}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sampling_probs(
    logprobs: torch.Tensor,  # [rows, vocab] float32 target log-probabilities
    batch: SamplingBatch,
    nucleus_logprobs: torch.Tensor | None = None,  # [rows, vocab] for conservative top-p rows
) -> torch.Tensor:  # [rows, vocab] float32: the distribution each row samples from
    """Apply temperature, top-k and top-p; greedy rows become one-hot on their best kept token.
    A step no row needs is skipped: each is a pass over [rows, vocab]."""
    assert logprobs.dim() == 2 and logprobs.shape[0] == batch.rows, logprobs.shape
    batch = batch.to(logprobs.device)
    if batch.all_greedy:  # the fast path; the same one-hot as below
        return one_hot_argmax(logprobs.float()).float()
    scaled = logprobs.float()
    if not bool((batch.temperature == 1).all()):
        scaled = scaled / torch.where(batch.temperature == 0, FILTER_TEMPERATURE_WHEN_GREEDY, batch.temperature)[:, None]
    if not bool((batch.top_k <= 0).all()):
        scaled = scaled.masked_fill(~top_k_mask(scaled, batch.top_k), -math.inf)
    conservative = nucleus_logprobs is not None and bool(batch.conservative.any())
    if bool((batch.top_p < 1).any()) or conservative:
        keep = top_p_mask(scaled, batch.top_p)
        if conservative:
            temperature = torch.where(batch.temperature == 0, FILTER_TEMPERATURE_WHEN_GREEDY, batch.temperature)[:, None]
            nucleus = top_p_mask(nucleus_logprobs.float() / temperature, batch.top_p)
            keep = torch.where(batch.conservative[:, None], nucleus & torch.isfinite(scaled), keep)
            keep |= ~keep.any(dim=-1, keepdim=True) & one_hot_argmax(scaled)  # an empty set keeps the best
        scaled = scaled.masked_fill(~keep, -math.inf)
    probs = torch.softmax(scaled, dim=-1)
    greedy = batch.temperature == 0
    if bool(greedy.any()):
        probs = torch.where(greedy[:, None], one_hot_argmax(probs).float(), probs)
    return probs


def draft_distribution(
    logits: torch.Tensor,  # [rows, vocab] the drafter's logits as they travel
    batch: SamplingBatch,
) -> torch.Tensor:  # [rows, vocab] q
    """The distribution a drafter samples its drafts from. The worker draws each draft from
    it and the coordinator's acceptance divides by it: exactness needs the two to compute it
    identically, from the same logits, so both call this."""
    return sampling_probs(torch.log_softmax(logits.float(), dim=-1), batch)


def top_k_mask(
    logits: torch.Tensor,  # [rows, vocab]
    top_k: torch.Tensor,  # [rows] int64, 0 = keep all
) -> torch.Tensor:  # [rows, vocab] bool: exactly min(k, vocab) tokens kept per filtered row
    vocab = logits.shape[-1]
    if bool((top_k <= 0).all()):  # no row filters: skip the sort (a real vocabulary makes it costly)
        return torch.ones_like(logits, dtype=torch.bool)
    k = torch.where(top_k <= 0, vocab, top_k.clamp(max=vocab))
    order = torch.argsort(logits, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(vocab, device=logits.device).expand_as(order))
    return rank < k[:, None]


TOP_P_CANDIDATES = (64, 1024)  # the most probable tokens looked at first, then more; a nucleus beyond them takes the full sort


def top_p_mask(
    logits: torch.Tensor,  # [rows, vocab] (log-probabilities up to a constant; -inf = excluded)
    top_p: torch.Tensor,  # [rows] float32 in (0, 1], 1 = keep all
) -> torch.Tensor:  # [rows, vocab] bool: smallest most-probable set with mass >= top_p
    """The mask ``top_p_mask_by_sort`` gives, bit for bit, from the most probable tokens
    where they settle it (TOP_P_CANDIDATES, fewest first): the nucleus ends inside them, and
    not inside a run of equal probabilities (where the stable sort's lower-index-first rule
    decides). Rows they do not settle take the full sort. A real model's nucleus is a few
    to a few hundred tokens, so most rows never sort the vocabulary."""
    if bool((top_p >= 1).all()):  # no row filters: skip the sort
        return torch.ones_like(logits, dtype=torch.bool)
    probs = torch.softmax(logits, dim=-1)
    pending, mask = torch.nonzero(top_p < 1).flatten(), None
    for candidates in TOP_P_CANDIDATES:
        every = len(pending) == len(probs)  # no rows to pick out: no copies
        settled, found = _nucleus_from_candidates(probs if every else probs[pending], top_p[pending], min(candidates, probs.shape[-1]))
        if mask is None and every and bool(settled.all()):
            return found  # the usual case: every row settled by the first candidates
        mask = torch.zeros_like(probs, dtype=torch.bool) if mask is None else mask
        mask[pending[settled]] = found[settled]
        pending = pending[~settled]
        if not len(pending):
            break
    if len(pending):
        mask[pending] = _nucleus_by_sort(probs[pending], top_p[pending])
    mask[top_p >= 1] = True
    return mask


def _nucleus_from_candidates(probs: torch.Tensor, top_p: torch.Tensor, candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which rows the ``candidates`` most probable tokens settle, and their masks."""
    values, index = torch.topk(probs, candidates, dim=-1)
    keep = (torch.cumsum(values, dim=-1) - values) < top_p[:, None]  # the same partial sums as over the sorted vocabulary
    kept = keep.sum(dim=-1, keepdim=True)
    last, first_dropped = values.gather(-1, kept - 1), values.gather(-1, kept.clamp(max=candidates - 1))
    settled = ((kept < candidates) & (first_dropped < last)).squeeze(-1)
    return settled, torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, index, keep)


def top_p_mask_by_sort(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The definition: sort the whole vocabulary (stable, so ties go to the lower token id)."""
    if bool((top_p >= 1).all()):
        return torch.ones_like(logits, dtype=torch.bool)
    return _nucleus_by_sort(torch.softmax(logits, dim=-1), top_p)


def _nucleus_by_sort(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    keep_sorted = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1)
    return torch.empty_like(keep_sorted).scatter_(-1, order, keep_sorted)


def one_hot_argmax(values: torch.Tensor) -> torch.Tensor:  # [rows, vocab] bool
    return torch.zeros_like(values, dtype=torch.bool).scatter_(-1, values.argmax(dim=-1, keepdim=True), True)


def sample_from_probs(
    probs: torch.Tensor,  # [rows, vocab], rows sum to 1
    generators: dict[int, torch.Generator],
) -> torch.Tensor:  # [rows] int64
    """Inverse transform: one uniform u per row, the first token whose cumulative mass
    exceeds u (times the row's total). One draw per row, where an exponential race would
    draw one per token: on a CPU, generating a vocabulary's worth of random numbers costs
    ten times the cumulative sum."""
    cumulative = torch.cumsum(probs, dim=-1)
    u = per_row_random((probs.shape[0], 1), generators, lambda t, g: t.uniform_(generator=g)).to(probs.device) * cumulative[:, -1:]
    tokens = torch.searchsorted(cumulative, u, right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)
    stray = probs.gather(-1, tokens[:, None])[:, 0] <= 0  # rounding put u at the very end: the last token with mass
    if bool(stray.any()):
        last = probs.shape[-1] - 1 - (probs[stray].flip(-1) > 0).int().argmax(dim=-1)
        tokens[stray] = last
    return tokens


def per_row_random(shape: tuple[int, ...], generators: dict[int, torch.Generator], fill) -> torch.Tensor:
    """A float32 tensor whose row i is filled by ``fill(row, generators[i])`` where seeded,
    and from the global generator elsewhere; on the CPU, where the generators are."""
    values = torch.empty(shape, dtype=torch.float32, device="cpu")
    seeded = set(generators)
    unseeded = [i for i in range(shape[0]) if i not in seeded]
    for row, generator in generators.items():
        fill(values[row], generator)
    if unseeded:
        rest = values[unseeded]
        fill(rest, None)
        values[unseeded] = rest
    return values


def sample(
    logprobs: torch.Tensor,  # [rows, vocab] float32 target log-probabilities
    batch: SamplingBatch,
    nucleus_logprobs: torch.Tensor | None = None,  # [rows, vocab]
) -> tuple[torch.Tensor, torch.Tensor]:  # tokens [rows] int64, their logprobs [rows]
    """Sample one token per row. The logprob returned is the token's under ``logprobs``
    (the model's distribution before temperature and filters, as vLLM reports it)."""
    probs = sampling_probs(logprobs, batch, nucleus_logprobs)
    if batch.all_greedy:  # no random numbers drawn: nothing depends on them
        tokens = probs.argmax(dim=-1)
        return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    tokens = sample_from_probs(probs, batch.generators)
    greedy = batch.temperature == 0
    tokens = torch.where(greedy, probs.argmax(dim=-1), tokens)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
