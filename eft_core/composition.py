"""Composition spec: which models an emulated model is made of.

Terms used throughout the project:

- **base**: the model that supplies knowledge (the large one when up-scaling).
- **delta**: a behaviour delta ``(tuned, reference, weight)``; ``reference`` is the model
  ``tuned`` was fine-tuned from, and ``weight`` scales the log-ratio ``tuned - reference``.
- **drafter**: the model that proposes tokens for speculative decoding; by default the
  tuned model of the first delta (the small chat model when up-scaling).
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass

from eft_core.errors import InvalidArgumentError, require


@dataclass(frozen=True)
class Delta:
    """``weight * (log p_tuned - log p_reference)``, added to the base's log-probabilities."""

    name: str
    tuned: str
    reference: str
    weight: float = 1.0


@dataclass(frozen=True)
class Composition:
    """An emulated model: ``base + sum_i weight_i * (tuned_i - reference_i)``."""

    name: str
    base: str
    deltas: tuple[Delta, ...] = ()
    drafter: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "deltas", tuple(self.deltas))
        require(_is_name(self.name), "name", f"must be a non-empty string, got {self.name!r}")
        require(_is_name(self.base), "base", f"must be a non-empty model name, got {self.base!r}")
        for i, delta in enumerate(self.deltas):
            _validate_delta(delta, f"deltas[{i}]")
        names = [d.name for d in self.deltas]
        for i, name in enumerate(names):
            require(name not in names[:i], f"deltas[{i}].name", f"duplicate delta name {name!r}")
        if self.drafter is not None:
            require(_is_name(self.drafter), "drafter", f"must be a non-empty model name, got {self.drafter!r}")

    @property
    def scored_models(self) -> tuple[str, ...]:
        """Distinct models whose logits enter the combination: base, then each tuned/reference."""
        names = [self.base] + [m for d in self.deltas for m in (d.tuned, d.reference)]
        return tuple(dict.fromkeys(names))

    @property
    def drafter_model(self) -> str | None:
        """The drafter: explicit, else the first delta's tuned model, else none (no speculation)."""
        if self.drafter is not None:
            return self.drafter
        return self.deltas[0].tuned if self.deltas else None

    @property
    def nucleus_model(self) -> str:
        """Where conservative top-p takes its nucleus from: the first delta's tuned model."""
        return self.deltas[0].tuned if self.deltas else self.base

    @property
    def models(self) -> tuple[str, ...]:
        """Every distinct model the composition needs, drafter included."""
        extra = (self.drafter_model,) if self.drafter_model else ()
        return tuple(dict.fromkeys(self.scored_models + extra))

    def weights(self, overrides: Mapping[str, float] | None = None) -> tuple[float, ...]:
        """Delta weights in delta order: the defaults, with per-request overrides by delta name."""
        overrides = dict(overrides or {})
        known = {d.name for d in self.deltas}
        for name, weight in overrides.items():
            if name not in known:
                raise InvalidArgumentError(
                    f"composition {self.name!r} has no delta {name!r} (deltas: {sorted(known)})",
                    field=f"weights[{name!r}]",
                )
            require(_is_finite_number(weight), f"weights[{name!r}]", f"must be a finite number, got {weight!r}")
        return tuple(float(overrides.get(d.name, d.weight)) for d in self.deltas)


def _validate_delta(delta: Delta, field: str) -> None:
    require(isinstance(delta, Delta), field, f"must be a Delta, got {type(delta).__name__}")
    require(_is_name(delta.name), f"{field}.name", f"must be a non-empty string, got {delta.name!r}")
    require(_is_name(delta.tuned), f"{field}.tuned", f"must be a non-empty model name, got {delta.tuned!r}")
    require(_is_name(delta.reference), f"{field}.reference", f"must be a non-empty model name, got {delta.reference!r}")
    require(_is_finite_number(delta.weight), f"{field}.weight", f"must be a finite number, got {delta.weight!r}")


def _is_name(value) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
