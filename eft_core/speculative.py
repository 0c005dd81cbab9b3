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

from collections.abc import Callable
from dataclasses import dataclass

import torch

from eft_core.errors import require
from eft_core.sampling import sample_from_probs


@dataclass(frozen=True)
class AcceptedDrafts:
    """Per row: how many drafts were accepted, and the tokens to emit."""

    num_accepted: torch.Tensor  # [batch] int64, in [0, num_draft[b]]
    output_tokens: torch.Tensor  # [batch, k + 1] int64: accepted drafts, then the recovered/bonus token, then -1

    @staticmethod
    def of(emitted: list[list[int]], k: int) -> "AcceptedDrafts":
        """From each row's emitted tokens (accepted drafts, then one more)."""
        padded = [tokens + [-1] * (k + 1 - len(tokens)) for tokens in emitted]
        return AcceptedDrafts(torch.tensor([len(t) - 1 for t in emitted], dtype=torch.int64, device="cpu"), torch.tensor(padded, dtype=torch.int64, device="cpu").reshape(len(emitted), k + 1))

    @property
    def num_emitted(self) -> torch.Tensor:  # [batch]: accepted + the one recovered or bonus token
        return self.num_accepted + 1

    def emitted(self, row: int) -> list[int]:
        return self.output_tokens[row, : int(self.num_emitted[row])].tolist()


@dataclass(frozen=True)
class DraftProbs:
    """q at the drafted positions of a batch, laid row after row (row b's k_b positions), as
    acceptance reads it: q_j(d_j) at every draft, and the whole q_j only at a row's first
    rejected draft. A drafter's q is often sparse (greedy or filtered drafting), so the whole
    rows stay as they travel until asked for."""

    at_drafts: torch.Tensor  # [sum(k_b)] float32: q_j(d_j)
    rows: Callable[[list[int]], torch.Tensor]  # positions -> [len(positions), vocab]: the whole q_j there

    @staticmethod
    def dense(q: torch.Tensor, draft_tokens: list[int]) -> "DraftProbs":  # q [sum(k_b), vocab]; the drafts, row after row
        tokens = torch.tensor(draft_tokens, dtype=torch.int64, device=q.device)
        return DraftProbs(q[torch.arange(len(tokens), device=q.device), tokens], lambda positions: q[positions])


def accept_drafts(
    draft_tokens: torch.Tensor,  # [batch, k] int64 (padding past num_draft)
    num_draft: torch.Tensor,  # [batch] int64 in [0, k]
    draft_probs: torch.Tensor,  # [batch, k, vocab] q
    target_probs: torch.Tensor,  # [batch, k + 1, vocab] p
    generators: dict[int, torch.Generator],  # seeded rows' generators
) -> AcceptedDrafts:
    """The exact rejection rule for rows padded to k drafts: ``accept_ragged`` on the rows
    without their padding."""
    _, k = _check_shapes(draft_tokens, num_draft, draft_probs, target_probs)
    counts = num_draft.tolist()
    drafts = [draft_tokens[b, :n].tolist() for b, n in enumerate(counts)]
    p = torch.cat([target_probs[b, : n + 1] for b, n in enumerate(counts)])
    q = torch.cat([draft_probs[b, :n] for b, n in enumerate(counts)])
    return AcceptedDrafts.of(accept_ragged(drafts, p, DraftProbs.dense(q, [t for row in drafts for t in row]), generators), k)


def accept_ragged(
    draft_tokens: list[list[int]],  # per row its k_b drafts (k_b may be 0: plain sampling)
    target_probs: torch.Tensor,  # [sum(k_b + 1), vocab] p: each row's k_b + 1 positions, row after row
    draft_probs: DraftProbs,  # q at each row's k_b positions, row after row
    generators: dict[int, torch.Generator],  # seeded rows' generators
) -> list[list[int]]:  # per row: its accepted drafts, then the recovered or bonus token
    """The rule for a batch of rows of different draft lengths, unpadded, so the coordinator
    decides every request of a batch at once. Per row, from its generator: k_b uniforms,
    then the next token's draw; a seeded row's output does not depend on its batch-mates,
    and a row with k_b = 0 is plain sampling from p. The per-draft numbers are decided on
    the CPU, the vocabulary-wide work where p is."""
    cpu, device = torch.device("cpu"), target_probs.device
    counts = torch.tensor([len(d) for d in draft_tokens], dtype=torch.int64, device=cpu)
    batch, k = len(draft_tokens), int(counts.max()) if draft_tokens else 0
    p_start = torch.cumsum(counts + 1, dim=0) - (counts + 1)  # each row's first target position
    q_start = torch.cumsum(counts, dim=0) - counts
    drafts = torch.tensor([d + [0] * (k - len(d)) for d in draft_tokens], dtype=torch.int64, device=cpu).reshape(batch, k)
    valid = torch.arange(k, device=cpu) < counts[:, None]
    p_rows = torch.where(valid, p_start[:, None] + torch.arange(k, device=cpu), 0)
    q_rows = torch.where(valid, q_start[:, None] + torch.arange(k, device=cpu), 0)
    p_draft = target_probs[p_rows.to(device), drafts.to(device)].to(cpu) if k else torch.zeros(batch, 0, device=cpu)
    q_draft = draft_probs.at_drafts.to(cpu)[q_rows] if k else torch.zeros(batch, 0, device=cpu)
    uniform = _ragged_uniforms(counts, k, generators)
    # accept d_j with probability min(1, p/q): u < p/q, written without dividing (u in [0, 1))
    accepted = (uniform * q_draft < p_draft) & valid
    num_accepted = accepted.long().cumprod(dim=-1).sum(dim=-1)  # leading run of acceptances
    # the next distribution: recovered max(0, p - q) after a rejection, else bonus p_{k+1}
    # (or, without drafts, p itself: no copy); only rejected rows compute a residual
    p_next = target_probs if not k else target_probs[(p_start + num_accepted).to(device)]
    rejected = num_accepted < counts
    if bool(rejected.any()):
        rows = rejected.nonzero()[:, 0]
        at = rows.to(device)
        p_rejected = p_next[at]
        residual = (p_rejected - draft_probs.rows((q_start + num_accepted)[rows].tolist()).to(device)).clamp_min(0)
        mass = residual.sum(dim=-1, keepdim=True)
        p_next[at] = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p_rejected)  # p == q: never rejected
    next_token = sample_from_probs(p_next, generators)  # draws from p's mass, whatever its total
    return [d[:n] + [t] for d, n, t in zip(draft_tokens, num_accepted.tolist(), next_token.tolist())]


def accept_greedy_ragged(
    draft_tokens: list[list[int]],  # per row its k_b drafts
    target_argmax: torch.Tensor,  # [sum(k_b + 1)] the target's greedy token per position, row after row
) -> list[list[int]]:
    """Greedy form (temperature 0): accept while the draft equals the target's argmax; the
    recovered token is the target's argmax at the first mismatch, the bonus its argmax after
    the last draft."""
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
    values = torch.zeros(len(counts), k, device="cpu")
    unseeded = [b for b in range(len(counts)) if b not in generators and counts[b] > 0]
    for row, generator in generators.items():
        if counts[row] > 0:
            values[row, : counts[row]].uniform_(generator=generator)
    if unseeded:
        rest = torch.rand(int(counts[unseeded].sum()), device="cpu")
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
    """``accept_greedy_ragged`` for rows padded to k drafts."""
    batch, k = draft_tokens.shape
    require(tuple(target_argmax.shape) == (batch, k + 1), "target_argmax", f"shape {tuple(target_argmax.shape)}, expected {(batch, k + 1)}")
    _check_num_draft(num_draft, batch, k)
    counts = num_draft.tolist()
    drafts = [draft_tokens[b, :n].tolist() for b, n in enumerate(counts)]
    best = torch.cat([target_argmax[b, : n + 1] for b, n in enumerate(counts)])
    return AcceptedDrafts.of(accept_greedy_ragged(drafts, best), k)


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
