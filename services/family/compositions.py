"""The family's compositions, as the serving default config will offer them."""

from eft_core import Composition, Delta

DEFAULT_MIXING_LAMBDA = 0.5


def family_compositions(mixing_lambda: float = DEFAULT_MIXING_LAMBDA, upscaling_weight: float = 1.0) -> dict[str, Composition]:
    """upscaled, the single models, and mixed = large-base + lambda * chat delta + (1 - lambda) * safe delta."""
    chat = Delta("chat", tuned="small-tuned", reference="small-base", weight=upscaling_weight)
    compositions = [
        Composition("upscaled", "large-base", (chat,)),
        Composition("small-tuned", "small-tuned", drafter="small-tuned"),
        Composition("large-base", "large-base"),
        Composition("large-tuned", "large-tuned"),
        Composition(
            "mixed",
            "large-base",
            (
                Delta("chat", "small-tuned", "small-base", mixing_lambda),
                Delta("safe", "small-safe", "small-base", 1.0 - mixing_lambda),
            ),
        ),
    ]
    return {c.name: c for c in compositions}
