"""The worker's verbs as plain Python values, shared by the worker, both transports and callers."""

from dataclasses import dataclass, field

import torch

from eft_core import SamplingParams


@dataclass(frozen=True)
class ExtendItem:
    """Append ``token_ids`` to a (session, model) cache and return the last ``num_logits``
    logits; with ``truncate_to``, first keep only that many cached tokens (a rollback that
    rides on the call instead of a Truncate of its own)."""

    session_id: str
    model: str
    token_ids: list[int]
    num_logits: int = 1
    truncate_to: int | None = None


@dataclass(frozen=True)
class DraftItem:
    """Append ``token_ids``, then sample ``num_draft`` tokens from ``model`` with ``sampling``
    (``truncate_to`` as in ExtendItem)."""

    session_id: str
    model: str
    token_ids: list[int]
    num_draft: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    truncate_to: int | None = None


@dataclass(frozen=True)
class Extended:
    logits: torch.Tensor  # [num_logits, tokenizer_size] in the requested wire dtype (or the model's own)
    cache_length: int


@dataclass(frozen=True)
class DraftQ:
    """The distribution q a drafter drew each of an item's k drafts from, as it travels:
    q_j(d_j), and each row whole, dense or sparse (eft.v1.DraftProbs)."""

    at_drafts: torch.Tensor  # [k] float32
    dense: torch.Tensor | None = None  # [k, vocab] float32, or None when sparse
    row_sizes: torch.Tensor | None = None  # sparse: [k] int64, each row's nonzero entries
    indices: torch.Tensor | None = None  # sparse: [entries] int32 token ids, row after row
    values: torch.Tensor | None = None  # sparse: [entries] float32

    @staticmethod
    def of(q: torch.Tensor, drafts: torch.Tensor) -> "DraftQ":
        """From whole rows ([k, vocab] float32) and the drafts drawn from them: sparse when
        its 8 bytes an entry take less than 4 bytes a token of every row."""
        at_drafts = q.gather(-1, drafts.long()[:, None])[:, 0]
        nonzero = q > 0
        row_sizes = nonzero.sum(dim=-1)
        if 2 * int(row_sizes.sum()) >= q.numel():
            return DraftQ(at_drafts, dense=q)
        rows, indices = nonzero.nonzero(as_tuple=True)
        return DraftQ(at_drafts, row_sizes=row_sizes, indices=indices.int(), values=q[rows, indices])

    @staticmethod
    def one_hot(drafts: torch.Tensor) -> "DraftQ":
        """Greedy drafting: each q_j is all mass on d_j."""
        ones = torch.ones(len(drafts))
        return DraftQ(ones, row_sizes=torch.ones(len(drafts), dtype=torch.int64), indices=drafts.int(), values=ones)

    def rows(self, positions: list[int], vocab: int) -> torch.Tensor:  # [len(positions), vocab] float32
        if self.dense is not None:
            return self.dense[positions]
        starts = torch.cumsum(self.row_sizes, dim=0) - self.row_sizes
        out = torch.zeros(len(positions), vocab, device=self.values.device)
        for i, j in enumerate(positions):
            span = slice(int(starts[j]), int(starts[j] + self.row_sizes[j]))
            out[i, self.indices[span].long()] = self.values[span]
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.at_drafts, self.dense, self.indices, self.values) if t is not None)


@dataclass(frozen=True)
class Drafted:
    draft_tokens: list[int]
    q: DraftQ  # what each draft was drawn from
    cache_length: int  # the last draft is not in the cache yet


@dataclass(frozen=True)
class ModelInfo:
    name: str
    tokenizer_fingerprint: str
    vocab_size: int
    tokenizer_size: int
    dtype: str
    device: str
    max_sequence_length: int
    tensor_parallel_size: int


@dataclass(frozen=True)
class WorkerInfo:
    models: list[ModelInfo]
    max_sessions: int
    max_cached_tokens: int
    sessions: int
    cached_tokens: int


@dataclass(frozen=True)
class WorkerLimits:
    """What one worker holds and computes at once (the worker CLI's flags, a worker group's config)."""

    max_sessions: int = 256  # (session, model) caches
    max_cached_tokens: int = 1 << 20  # token slots over all models' caches: per model, its sessions x its longest session
    max_forward_tokens: int = 8192  # positions per forward, padding included: longer prefills are chunked

    def largest_request_bytes(self) -> int:
        """The largest Extend or Draft request a coordinator can make of such a worker: every
        token it sends must fit the cache (at most 5 bytes each as varints), plus each
        session's framing; the worker's receive limit, where gRPC's would be 512 MiB."""
        return self.max_cached_tokens * 5 + self.max_sessions * 1024 + (64 << 10)

    def flags(self) -> list[str]:
        """As the worker CLI takes them (a tensor-parallel rank 0 starts its followers with these)."""
        return [f"--{name.replace('_', '-')}={value}" for name, value in vars(self).items()]
