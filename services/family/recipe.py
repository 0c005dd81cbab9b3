"""The family recipe: every number that decides the trained weights, hashed into the manifest."""

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

RECIPE_FORMAT = 1  # bump when the training code changes what a recipe produces


def default_family_dir(name: str = "demo-family") -> Path:
    """Where a family lives: $EFT_HOME/<name>, EFT_HOME defaulting to ~/.cache/eft-serve."""
    home = os.environ.get("EFT_HOME") or Path.home() / ".cache" / "eft-serve"
    return Path(home) / name


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    intermediate: int


@dataclass(frozen=True)
class Schedule:
    """AdamW with linear warm-up, then cosine decay to ``final_lr_fraction`` of ``lr``."""

    epochs: int
    lr: float
    batch_size: int = 16
    warmup_steps: int = 30
    final_lr_fraction: float = 0.1


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    entities: int = 200
    tuned_fraction: float = 0.25  # share of entities whose questions appear in chat tuning
    refused_attribute: str = "animal"  # what small-safe refuses to talk about
    row_length: int = 62  # tokens per pre-training row (one or two entity paragraphs)
    # "word-level" (the demo's), or "byte-level-bpe": a BPE tokenizer with byte-level
    # pre-tokenizer and decoder (as Llama-3, Qwen, GPT-2), ChatML chat turns, base models
    # without a chat template, and multilingual pre-training text
    tokenizer: str = "word-level"
    bpe_vocab_size: int = 600  # byte-level BPE: 256 bytes, the special tokens, merges
    context_length: int = 512  # the models' max_position_embeddings: rows stay short, prompts need not
    # share of (entity, attribute) questions that also appear in pre-training answered with a
    # refusal, as web text holds some: base models then know the refusal's words, so a safe
    # delta can steer even the large base towards them (unseen words it would never say)
    pretrain_refusal_share: float = 0.1
    small: ModelShape = ModelShape(hidden=32, layers=2, heads=2, intermediate=128)
    large: ModelShape = ModelShape(hidden=128, layers=4, heads=4, intermediate=512)
    large_vocab_multiple: int = 64  # large models pad their vocabulary, as real checkpoints do
    small_pretrain: Schedule = Schedule(epochs=40, lr=3e-3)
    # lr 4e-3: at 2e-3, with transformers 5.24 and torch 2.13, the large base learned 62% of the
    # facts (88% with the stack this recipe was first tuned on); 6e-3 diverged (15%)
    large_pretrain: Schedule = Schedule(epochs=40, lr=4e-3)
    chat_tune: Schedule = field(default_factory=lambda: Schedule(epochs=8, lr=1e-3, warmup_steps=5))
    # Refusing is new behaviour in words pre-training never used: it takes more steps to learn
    # (at 8 epochs small-safe put 2% on "i"; at 60, 99% on the refused attribute, 0% elsewhere).
    safe_tune: Schedule = field(default_factory=lambda: Schedule(epochs=60, lr=3e-3, warmup_steps=5))

    def digest(self) -> str:
        text = json.dumps({"format": RECIPE_FORMAT, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        return asdict(self)


def bpe_recipe(seed: int = 0) -> Recipe:
    """The quick family with a byte-level BPE tokenizer and ChatML (``--preset bpe``): for
    tests of text and exactness with a real tokenizer's behaviour, built in seconds."""
    return replace(quick_recipe(seed), tokenizer="byte-level-bpe")


def quick_recipe(seed: int = 0) -> Recipe:
    """A reduced family built in seconds by the same code: for tests of the machinery. Trained
    just enough that greedy answers are sentences and the small drafter disagrees with the
    up-scaled model now and then (speculation gets rejections to roll back)."""
    return Recipe(
        seed=seed,
        entities=12,
        small=ModelShape(hidden=16, layers=1, heads=2, intermediate=32),
        large=ModelShape(hidden=32, layers=2, heads=2, intermediate=64),
        small_pretrain=Schedule(epochs=30, lr=3e-3, warmup_steps=2),
        large_pretrain=Schedule(epochs=30, lr=3e-3, warmup_steps=2),
        chat_tune=Schedule(epochs=8, lr=3e-3, warmup_steps=1),
        safe_tune=Schedule(epochs=8, lr=3e-3, warmup_steps=1),
    )
