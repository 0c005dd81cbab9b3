"""Combination: per-model logits -> the emulated (EFT) next-token log-probabilities.

For each position, with ``l_m = log_softmax(logits_m)``::

    z     = l_base + sum_i weight_i * (l_tuned_i - l_reference_i)
    p_eft = softmax(z)            # temperature and filters come later (eft_core.sampling)

The per-model normalisers are constants per position, so they cancel in the final softmax:
we combine raw logits in float32 and normalise once. Terms are first gathered into one
coefficient per distinct model, so the identities hold bit for bit: all weights 0 gives
exactly ``log_softmax(logits_base)``; base = reference with weight 1 gives exactly
``log_softmax(logits_tuned)``.

The **implicit reward** of token y for delta i is ``l_tuned_i(y) - l_reference_i(y)``.
"""

from collections.abc import Mapping, Sequence

import torch

from eft_core.composition import Composition
from eft_core.errors import InvalidArgumentError, require


def eft_logprobs(
    logits: Mapping[str, torch.Tensor],  # model name -> [batch, positions, vocab_m]
    composition: Composition,
    weights: Sequence[float] | torch.Tensor | None = None,  # [n_deltas] or [batch, n_deltas]
    vocab_size: int | None = None,
) -> torch.Tensor:  # [batch, positions, vocab] float32
    """EFT log-probabilities over the shared real vocabulary, DESIGN.md section 2."""
    models = composition.scored_models
    scored = real_vocab_logits({m: _logits_of(logits, m) for m in models}, vocab_size)
    batch, device = scored[composition.base].shape[0], scored[composition.base].device
    coefficients = model_coefficients(composition, weights_matrix(composition, weights, batch).to(device))
    z = None
    for index, model in enumerate(models):
        c = coefficients[:, index, None, None]  # [batch, 1, 1]
        if bool((c == 0).any()):  # a zero coefficient contributes an exact 0, never 0 * -inf = nan
            term = torch.where(c == 0, 0.0, c * scored[model].float())
            z = term if z is None else z.add_(term)
        elif z is None:
            z = scored[model].float() * c  # the first term makes the sum: no zero-filled start
        else:
            z.addcmul_(c, scored[model])  # in place: no [batch, positions, vocab] temporary
    return torch.log_softmax(z, dim=-1)  # not z - logsumexp(z): the identities hold bit for bit against log_softmax


def model_coefficients(
    composition: Composition,
    weights: torch.Tensor,  # [batch, n_deltas] float32
) -> torch.Tensor:  # [batch, n_scored_models]: z = sum_m coefficient_m * logits_m
    """Gather base, tuned and reference terms into one coefficient per distinct model."""
    index = {m: i for i, m in enumerate(composition.scored_models)}
    coefficients = torch.zeros(weights.shape[0], len(index), dtype=torch.float32, device=weights.device)
    coefficients[:, index[composition.base]] += 1.0
    for i, delta in enumerate(composition.deltas):
        coefficients[:, index[delta.tuned]] += weights[:, i]
        coefficients[:, index[delta.reference]] -= weights[:, i]
    return coefficients


def weights_matrix(
    composition: Composition,
    weights: Sequence[float] | torch.Tensor | None,
    batch: int,
) -> torch.Tensor:  # [batch, n_deltas] float32
    """Per-row delta weights: the composition's defaults, one vector for all, or one per row."""
    n = len(composition.deltas)
    if weights is None:
        weights = composition.weights()
    weights = torch.as_tensor(weights, dtype=torch.float32, device=weights.device if isinstance(weights, torch.Tensor) else "cpu")
    if weights.dim() == 1:
        weights = weights.expand(batch, -1)
    require(
        tuple(weights.shape) == (batch, n),
        "weights",
        f"shape {tuple(weights.shape)} does not fit {batch} rows x {n} deltas",
    )
    require(bool(torch.isfinite(weights).all()), "weights", "must be finite (got NaN or infinity)")
    return weights


def real_vocab_logits(
    logits: Mapping[str, torch.Tensor],  # model name -> [batch, positions, vocab_m]
    vocab_size: int | None = None,
) -> dict[str, torch.Tensor]:  # model name -> [batch, positions, vocab_size]
    """Cut every model's logits to the tokenizer's real vocabulary (drop padding rows).

    ``vocab_size`` is the shared tokenizer's size; a model with fewer rows than that does
    not cover the vocabulary and is refused. Without ``vocab_size`` all widths must agree.
    Leading dimensions (batch, positions) must agree too.
    """
    widths = {m: t.shape[-1] for m, t in logits.items()}
    if vocab_size is None:
        require(len(set(widths.values())) <= 1, "logits", f"vocabulary sizes differ {widths}: pass vocab_size, the tokenizer's size")
        vocab_size = next(iter(widths.values()), 0)
    leading = None
    for model, tensor in logits.items():
        require(tensor.dim() == 3, f"logits[{model!r}]", f"must be [batch, positions, vocab], got shape {tuple(tensor.shape)}")
        require(tensor.is_floating_point(), f"logits[{model!r}]", f"must be a float tensor, got {tensor.dtype}")
        require(leading in (None, tensor.shape[:2]), f"logits[{model!r}]", f"shape {tuple(tensor.shape)} disagrees with {tuple(leading or ())} of the others")
        require(
            widths[model] >= vocab_size,
            f"logits[{model!r}]",
            f"has {widths[model]} vocabulary rows, fewer than the shared vocabulary's {vocab_size}: not the same tokenizer",
        )
        leading = tensor.shape[:2]
    return {m: t[..., :vocab_size] for m, t in logits.items()}


def implicit_rewards(
    logits: Mapping[str, torch.Tensor],  # model name -> [batch, positions, vocab_m] (the deltas' models at least)
    composition: Composition,
    tokens: torch.Tensor,  # [batch, positions] chosen token ids
    vocab_size: int | None = None,
) -> torch.Tensor:  # [batch, positions, n_deltas] float32
    """Per-token implicit reward of each delta: ``l_tuned(y) - l_reference(y)``, each model's
    ``l(y)`` a gather minus its normaliser (no log-softmax of the vocabulary), once per model."""
    models = list(dict.fromkeys(m for d in composition.deltas for m in (d.tuned, d.reference)))
    scored = real_vocab_logits({m: _logits_of(logits, m) for m in models}, vocab_size)
    index = tokens.long().unsqueeze(-1)
    chosen = {m: x.gather(-1, index).squeeze(-1).float() - torch.logsumexp(x.float(), dim=-1) for m, x in scored.items()}  # [batch, positions]
    rewards = [chosen[d.tuned] - chosen[d.reference] for d in composition.deltas]
    return torch.stack(rewards, dim=-1) if rewards else torch.zeros(*tokens.shape, 0, device=tokens.device)


def _logits_of(logits: Mapping[str, torch.Tensor], model: str) -> torch.Tensor:
    if model not in logits:
        raise InvalidArgumentError(f"no logits for model {model!r} (have {sorted(logits)})", field=f"logits[{model!r}]")
    return logits[model]
