"""Speculative acceptance: exact rejection sampling of drafted tokens (DESIGN.md 2.1).

Terms, used in every name below (after vLLM's rejection sampler):

- **draft tokens** ``d_1..d_k``: proposed by the drafter, ``d_j ~ q_j``.
- ``q_j``: the drafter's distribution at draft position j (after temperature and filters).
- ``p_j``: the target (EFT) distribution at position j, for j = 1..k+1, from one scoring pass.
- **accepted**: ``d_j`` is kept with probability ``min(1, p_j(d_j) / q_j(d_j))``, in order,
  until the first rejection.
- **recovered** token: at the first rejected position j, drawn from
  ``normalise(max(0, p_j - q_j))``; nothing after it is kept.
- **bonus** token: when all k drafts are accepted, drawn from ``p_{k+1}``.

Every row emits its accepted drafts plus exactly one recovered or bonus token. The emitted
tokens are distributed exactly as tokens sampled one by one from p (Leviathan et al. 2023,
Chen et al. 2023), whatever q is, as long as each d_j was really drawn from q_j.
Rows may draft different numbers of tokens: ``num_draft[b] <= k``; positions past a row's
own count are padding and never read.
"""

from dataclasses import dataclass

import torch

from eft_core.errors import require
from eft_core.sampling import per_row_random, sample_from_probs


@dataclass(frozen=True)
class AcceptedDrafts:
    """Per row: how many drafts were accepted, and the tokens to emit."""

    num_accepted: torch.Tensor  # [batch] int64, in [0, num_draft[b]]
    output_tokens: torch.Tensor  # [batch, k + 1] int64: accepted drafts, then the recovered/bonus token, then -1

    @property
    def num_emitted(self) -> torch.Tensor:  # [batch]: accepted + the one recovered or bonus token
        return self.num_accepted + 1

    def emitted(self, row: int) -> list[int]:
        return self.output_tokens[row, : int(self.num_emitted[row])].tolist()


def accept_drafts(
    draft_tokens: torch.Tensor,  # [batch, k] int64 (padding past num_draft)
    num_draft: torch.Tensor,  # [batch] int64 in [0, k]
    draft_probs: torch.Tensor,  # [batch, k, vocab] q
    target_probs: torch.Tensor,  # [batch, k + 1, vocab] p
    generators: dict[int, torch.Generator],  # seeded rows' generators
) -> AcceptedDrafts:
    """The exact rejection rule for a batch of rows with different draft lengths."""
    batch, k = _check_shapes(draft_tokens, num_draft, draft_probs, target_probs)
    rows = torch.arange(batch)
    drafts = draft_tokens.long()[..., None]
    p_draft = target_probs[:, :k].gather(-1, drafts).squeeze(-1)  # [batch, k]
    q_draft = draft_probs.gather(-1, drafts).squeeze(-1)  # [batch, k]
    uniform = per_row_random((batch, k), generators, lambda t, g: t.uniform_(generator=g))
    # accept d_j with probability min(1, p/q): u < p/q, written without dividing (u in [0, 1))
    accepted = (uniform * q_draft < p_draft) & (torch.arange(k) < num_draft[:, None])
    num_accepted = accepted.long().cumprod(dim=-1).sum(dim=-1)  # leading run of acceptances
    # the next distribution: recovered max(0, p - q) after a rejection, else bonus p_{k+1}
    p_next = target_probs[rows, num_accepted]  # [batch, vocab]
    q_padded = torch.cat([draft_probs, draft_probs.new_zeros(batch, 1, target_probs.shape[-1])], dim=1)
    q_next = torch.where((num_accepted < num_draft)[:, None], q_padded[rows, num_accepted], 0.0)
    residual = (p_next - q_next).clamp_min(0)
    mass = residual.sum(dim=-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p_next)  # p == q: never rejected
    next_token = sample_from_probs(residual, generators)
    return AcceptedDrafts(num_accepted, _output_tokens(draft_tokens.long(), num_accepted, next_token))


def accept_ragged(
    draft_tokens: list[list[int]],  # per row its k_b drafts (k_b may be 0: plain sampling)
    target_probs: torch.Tensor,  # [sum(k_b + 1), vocab] p: each row's k_b + 1 positions, row after row
    draft_probs: torch.Tensor,  # [sum(k_b), vocab] q: each row's k_b positions, row after row
    generators: dict[int, torch.Generator],  # seeded rows' generators
) -> list[list[int]]:  # per row: its accepted drafts, then the recovered or bonus token
    """``accept_drafts`` for rows of different draft lengths without padding them, so the
    coordinator decides every request of a batch at once. The same rule and the same random
    numbers per row: k_b uniforms, then the next token's draw, from the row's generator; a
    seeded row's output is the one ``accept_drafts`` gives it alone, and a row with k_b = 0
    is plain sampling from p."""
    counts = torch.tensor([len(d) for d in draft_tokens], dtype=torch.int64)
    batch, k = len(draft_tokens), int(counts.max()) if draft_tokens else 0
    p_start = torch.cumsum(counts + 1, dim=0) - (counts + 1)  # each row's first target position
    q_start = torch.cumsum(counts, dim=0) - counts
    drafts = torch.tensor([d + [0] * (k - len(d)) for d in draft_tokens], dtype=torch.int64).reshape(batch, k)
    valid = torch.arange(k) < counts[:, None]
    p_rows = torch.where(valid, p_start[:, None] + torch.arange(k), 0)
    q_rows = torch.where(valid, q_start[:, None] + torch.arange(k), 0)
    p_draft = target_probs[p_rows, drafts] if k else torch.zeros(batch, 0)
    q_draft = draft_probs[q_rows, drafts] if k else torch.zeros(batch, 0)
    uniform = _ragged_uniforms(counts, k, generators)
    accepted = (uniform * q_draft < p_draft) & valid
    num_accepted = accepted.long().cumprod(dim=-1).sum(dim=-1)
    p_next = target_probs[p_start + num_accepted]
    rejected = num_accepted < counts
    q_next = torch.where(rejected[:, None], draft_probs[torch.where(rejected, q_start + num_accepted, 0)], 0.0) if draft_probs.shape[0] else torch.zeros_like(p_next)
    residual = (p_next - q_next).clamp_min(0)
    mass = residual.sum(dim=-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p_next)
    next_token = sample_from_probs(residual, generators)
    return [d[:n] + [int(t)] for d, n, t in zip(draft_tokens, num_accepted.tolist(), next_token)]


def accept_greedy_ragged(
    draft_tokens: list[list[int]],  # per row its k_b drafts
    target_argmax: torch.Tensor,  # [sum(k_b + 1)] the target's greedy token per position, row after row
) -> list[list[int]]:
    """``accept_drafts_greedy`` for rows of different draft lengths, unpadded."""
    out, start = [], 0
    best = target_argmax.tolist()
    for drafts in draft_tokens:
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == best[start + accepted]:
            accepted += 1
        out.append(drafts[:accepted] + [best[start + accepted]])
        start += len(drafts) + 1
    return out


def _ragged_uniforms(counts: torch.Tensor, k: int, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """[rows, k] uniforms: row b's first counts[b] from its generator (or the global one);
    the rest are never read."""
    values = torch.zeros(len(counts), k)
    unseeded = [b for b in range(len(counts)) if b not in generators and counts[b] > 0]
    for row, generator in generators.items():
        if counts[row] > 0:
            values[row, : counts[row]].uniform_(generator=generator)
    if unseeded:
        rest = torch.rand(int(counts[unseeded].sum()))
        offset = 0
        for row in unseeded:
            values[row, : counts[row]] = rest[offset : offset + counts[row]]
            offset += int(counts[row])
    return values


def accept_drafts_greedy(
    draft_tokens: torch.Tensor,  # [batch, k] int64 (padding past num_draft)
    num_draft: torch.Tensor,  # [batch] int64 in [0, k]
    target_argmax: torch.Tensor,  # [batch, k + 1] int64: the target's greedy token per position
) -> AcceptedDrafts:
    """Greedy form (temperature 0): accept while the draft equals the target's argmax; the
    recovered token is the target's argmax at the first mismatch, the bonus its argmax at k+1."""
    batch, k = draft_tokens.shape
    require(tuple(target_argmax.shape) == (batch, k + 1), "target_argmax", f"shape {tuple(target_argmax.shape)}, expected {(batch, k + 1)}")
    _check_num_draft(num_draft, batch, k)
    matches = (draft_tokens.long() == target_argmax[:, :k]) & (torch.arange(k) < num_draft[:, None])
    num_accepted = matches.long().cumprod(dim=-1).sum(dim=-1)
    next_token = target_argmax.gather(-1, num_accepted[:, None]).squeeze(-1)
    return AcceptedDrafts(num_accepted, _output_tokens(draft_tokens.long(), num_accepted, next_token))


def _output_tokens(
    draft_tokens: torch.Tensor,  # [batch, k]
    num_accepted: torch.Tensor,  # [batch]
    next_token: torch.Tensor,  # [batch]
) -> torch.Tensor:  # [batch, k + 1]
    batch, k = draft_tokens.shape
    positions = torch.arange(k + 1)
    padded = torch.cat([draft_tokens, torch.full((batch, 1), -1)], dim=1)
    out = torch.where(positions < num_accepted[:, None], padded, -1)
    return out.scatter(-1, num_accepted[:, None], next_token[:, None])


def _check_shapes(draft_tokens, num_draft, draft_probs, target_probs) -> tuple[int, int]:
    require(draft_tokens.dim() == 2, "draft_tokens", f"must be [batch, k], got shape {tuple(draft_tokens.shape)}")
    batch, k = draft_tokens.shape
    require(draft_probs.dim() == 3 and tuple(draft_probs.shape[:2]) == (batch, k), "draft_probs", f"shape {tuple(draft_probs.shape)}, expected ({batch}, {k}, vocab)")
    vocab = draft_probs.shape[-1]
    require(tuple(target_probs.shape) == (batch, k + 1, vocab), "target_probs", f"shape {tuple(target_probs.shape)}, expected {(batch, k + 1, vocab)}")
    _check_num_draft(num_draft, batch, k)
    return batch, k


def _check_num_draft(num_draft: torch.Tensor, batch: int, k: int) -> None:
    require(tuple(num_draft.shape) == (batch,), "num_draft", f"shape {tuple(num_draft.shape)}, expected ({batch},)")
    require(bool(((num_draft >= 0) & (num_draft <= k)).all()), "num_draft", f"each must be in [0, {k}], got {num_draft.tolist()}")
