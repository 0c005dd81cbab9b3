"""Small builders shared by the eft_core tests: random distributions, toy models, distances."""

from collections.abc import Sequence

import torch

from eft_core import Composition, Delta


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_probs(*shape: int, seed: int, sharpness: float = 1.5) -> torch.Tensor:
    """Random distributions over the last dimension (softmax of scaled normal noise)."""
    return torch.softmax(sharpness * torch.randn(*shape, generator=seeded(seed)), dim=-1)


def perturbed(probs: torch.Tensor, seed: int, size: float = 0.15) -> torch.Tensor:
    """A nearby wrong distribution: log-probs shifted by noise of the given size."""
    noise = size * torch.randn(probs.shape, generator=seeded(seed))
    return torch.softmax(probs.log() + noise, dim=-1)


def tv_distance(counts: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Total variation between empirical counts and distributions, over the last dim."""
    empirical = counts / counts.sum(dim=-1, keepdim=True).clamp_min(1)
    return 0.5 * (empirical - probs).abs().sum(dim=-1)


class ToyModel:
    """A deterministic 'language model': next-token logits are a fixed random function of
    its own prompt plus the generated tokens. ``padding`` adds vocabulary rows past the
    shared vocabulary (as real checkpoints pad 32000 to 32001)."""

    def __init__(self, seed: int, vocab: int, prompt: Sequence[int] = (), scale: float = 2.0, padding: int = 0):
        self.seed, self.vocab, self.prompt, self.scale, self.padding = seed, vocab, tuple(prompt), scale, padding
        self.calls = 0

    def __call__(self, generated: Sequence[int]) -> torch.Tensor:  # [vocab + padding]
        self.calls += 1
        key = hash((self.seed, *self.prompt, -1, *generated)) % (2**62)
        logits = self.scale * torch.randn(self.vocab, generator=seeded(key))
        return torch.cat([logits, torch.full((self.padding,), 5.0)])


def upscaling(weight: float = 1.0, drafter: str | None = None) -> Composition:
    """large base + weight * (small tuned - small base): the paper's up-scaling."""
    return Composition("upscaled", "large", (Delta("chat", "small_tuned", "small", weight),), drafter)


def toy_family(vocab: int, seed: int = 0, padding: int = 0) -> dict[str, ToyModel]:
    """Toy models for up-scaling, each with its own prompt (its own template)."""
    return {
        "large": ToyModel(seed + 1, vocab, prompt=(1, 2), padding=padding),
        "small_tuned": ToyModel(seed + 2, vocab, prompt=(7, 1, 2, 8)),
        "small": ToyModel(seed + 3, vocab, prompt=(1, 2)),
    }
