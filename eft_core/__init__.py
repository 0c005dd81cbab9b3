"""eft_core: the exact math of emulated fine-tuning, in pure torch.

Composition spec, logit combination, sampling, speculative acceptance, step statistics,
the reference decoding loop and the project's error types. Imports no ray, grpc,
transformers or pydantic (DESIGN.md section 4).
"""

from eft_core.combine import eft_logprobs, implicit_rewards, model_coefficients, real_vocab_logits
from eft_core.composition import Composition, Delta
from eft_core.errors import DeadlineExceededError, EFTError, InternalError, InvalidArgumentError, NotFoundError, OverloadedError, ResourceExhaustedError, UnavailableError
from eft_core.reference import Generation, LogitsSource, generate
from eft_core.sampling import SamplingBatch, SamplingParams, sample, sample_from_probs, sampling_probs
from eft_core.speculative import AcceptedDrafts, accept_drafts, accept_drafts_greedy
from eft_core.stats import SpeculationStats

__all__ = [
    "AcceptedDrafts",
    "Composition",
    "DeadlineExceededError",
    "Delta",
    "EFTError",
    "Generation",
    "InternalError",
    "InvalidArgumentError",
    "LogitsSource",
    "NotFoundError",
    "OverloadedError",
    "ResourceExhaustedError",
    "SamplingBatch",
    "SamplingParams",
    "SpeculationStats",
    "UnavailableError",
    "accept_drafts",
    "accept_drafts_greedy",
    "eft_logprobs",
    "generate",
    "implicit_rewards",
    "model_coefficients",
    "real_vocab_logits",
    "sample",
    "sample_from_probs",
    "sampling_probs",
]
