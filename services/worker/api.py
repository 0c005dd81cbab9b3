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
    logits: torch.Tensor  # [num_logits, tokenizer_size] in the requested wire dtype
    cache_length: int


@dataclass(frozen=True)
class Drafted:
    draft_tokens: list[int]
    logits: torch.Tensor  # [num_draft, tokenizer_size] in the requested wire dtype
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
    max_cached_tokens: int = 1 << 20  # tokens over all caches
    max_forward_tokens: int = 8192  # positions per forward, padding included: longer prefills are chunked

    def flags(self) -> list[str]:
        """As the worker CLI takes them (a tensor-parallel rank 0 starts its followers with these)."""
        return [f"--{name.replace('_', '-')}={value}" for name, value in vars(self).items()]
