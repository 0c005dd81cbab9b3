"""`eft family build`: train the demo family and save it as Hugging Face folders.

Layout of the family folder::

    family.json        manifest: recipe, its digest, per-model facts, build time
    world.json         the facts the models were taught (for evaluation)
    small-base/ small-tuned/ small-safe/ large-base/ large-tuned/
                       config.json, model.safetensors, tokenizer files with the chat template

A folder whose manifest carries the same recipe digest is reused; a changed recipe (or
--force) rebuilds. Building happens in a temporary sibling folder that replaces the old one
only when complete, so an interrupted build never leaves a half family behind.
"""

import copy
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm

from services.family.recipe import Recipe, default_family_dir
from services.family.tokenizer import build_byte_level_tokenizer, build_tokenizer, to_chatml, with_chatml, with_template
from services.family.training import encode_rows, new_model, train
from services.family.world import ATTRIBUTES, World, chat_documents, make_world, pretraining_documents, question
from services.progress import bar

MANIFEST = "family.json"
WORLD = "world.json"
TOKENIZER_KINDS = ("word-level", "byte-level-bpe")
MODEL_NAMES = ("small-base", "small-tuned", "small-safe", "large-base", "large-tuned")
CHAT_MODELS = {"small-tuned", "small-safe", "large-tuned"}


@dataclass(frozen=True)
class Family:
    """A built family on disk."""

    path: Path
    manifest: dict

    def model_path(self, name: str) -> Path:
        return self.path / name

    def world(self) -> World:
        data = json.loads((self.path / WORLD).read_text())
        facts = {(f["entity"], f["attribute"]): f["value"] for f in data["facts"]}
        values = {a: tuple(v) for a, v in data["values"].items()}
        return World(tuple(data["entities"]), values, facts, tuple(data["tuned_entities"]))

    @property
    def refused_attribute(self) -> str:
        return self.manifest["recipe"]["refused_attribute"]


def load_family(path: Path) -> Family:
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no demo family at {path} (missing {MANIFEST}): run `eft family build --out {path}`")
    return Family(Path(path), json.loads(manifest_path.read_text()))


def build_family(out: Path | None = None, recipe: Recipe = Recipe(), force: bool = False, log=tqdm.write) -> Family:
    """Build (or reuse) the family for ``recipe`` in ``out``."""
    out = Path(out or default_family_dir())
    if not force and _is_current(out, recipe):
        log(f"family at {out} is up to date (recipe {recipe.digest()}): reusing it")
        return load_family(out)
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise FileExistsError(f"{out} exists and holds something other than a demo family: choose another --out")
    staging = out.with_name(f".{out.name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        manifest = _train_family(staging, recipe, log)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"family built in {manifest['build_seconds']:.0f} s at {out}")
    return load_family(out)


def _is_current(out: Path, recipe: Recipe) -> bool:
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("recipe_digest") == recipe.digest() and all((out / m / "config.json").is_file() for m in MODEL_NAMES)


def _train_family(folder: Path, recipe: Recipe, log) -> dict:
    started = time.perf_counter()
    world = make_world(recipe)
    byte_level = _byte_level(recipe)
    documents = pretraining_documents(world, random.Random(recipe.seed), recipe.row_length, recipe.pretrain_refusal_share, multilingual=byte_level)
    chat, safe = chat_documents(world), chat_documents(world, refuse=recipe.refused_attribute)
    if byte_level:  # same world, same documents, in ChatML and BPE; rows as long as the longest
        documents, chat, safe = ([to_chatml(d) for d in texts] for texts in (documents, chat, safe))
        tokenizer = build_byte_level_tokenizer(documents + chat + safe, recipe.bpe_vocab_size)
        row_length = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in documents + chat + safe)
    else:
        eval_questions = [question(e, a) for e, a in world.questions()]
        tokenizer, row_length = build_tokenizer(documents + chat + safe + eval_questions), recipe.row_length
    rows = {name: encode_rows(tokenizer, texts, row_length) for name, texts in [("pre", documents), ("chat", chat), ("safe", safe)]}
    log(f"world: {len(world.entities)} entities, {len(documents)} pre-training rows, {len(chat)} chat rows, vocabulary {len(tokenizer)}")

    models, losses, seconds = {}, {}, {}
    steps = [
        ("small-base", "small", None, "pre"),
        ("large-base", "large", None, "pre"),
        ("small-tuned", "small", "small-base", "chat"),
        ("small-safe", "small", "small-base", "safe"),
        ("large-tuned", "large", "large-base", "chat"),
    ]
    for offset, (name, size, parent, data) in enumerate(bar(steps, desc="family", unit="model")):
        tick = time.perf_counter()
        models[name], losses[name] = _train_one(recipe, tokenizer, rows, size, parent and models[parent], data, recipe.seed + offset, name)
        seconds[name] = time.perf_counter() - tick
        log(f"  {name}: {seconds[name]:.1f} s, final loss {losses[name]:.3f}")

    for name, model in models.items():
        model.save_pretrained(folder / name)
        templated = with_chatml if byte_level else with_template
        templated(copy.deepcopy(tokenizer), chat=name in CHAT_MODELS).save_pretrained(folder / name)
    _write_world(folder / WORLD, world, recipe)
    return {
        "recipe_digest": recipe.digest(),
        "recipe": recipe.to_json(),
        "vocab_size": len(tokenizer),
        "models": {
            name: {
                "template": "chat" if name in CHAT_MODELS else "plain",
                "parameters": sum(p.numel() for p in model.parameters()),
                "padded_vocab_size": model.config.vocab_size,
                "final_loss": round(losses[name], 4),
                "train_seconds": round(seconds[name], 1),
            }
            for name, model in models.items()
        },
        "build_seconds": time.perf_counter() - started,
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def _byte_level(recipe: Recipe) -> bool:
    if recipe.tokenizer not in TOKENIZER_KINDS:
        raise ValueError(f"recipe.tokenizer: {recipe.tokenizer!r} is not one of {TOKENIZER_KINDS}")
    return recipe.tokenizer == "byte-level-bpe"


def _train_one(recipe, tokenizer, rows, size, parent, data, seed, name):
    """Pre-train a fresh model, or chat-tune a copy of ``parent``: batches mixed 1:1 with
    pre-training rows, and the embeddings of every token seen in pre-training frozen (tied,
    so the output rows too): tuning then cannot unlearn how to repeat entity names, while
    the words only chat uses (<user>, <assistant>, the refusal) still learn."""
    if parent is None:
        shape, schedule = getattr(recipe, size), getattr(recipe, f"{size}_pretrain")
        multiple = recipe.large_vocab_multiple if size == "large" else 1
        model = new_model(shape, tokenizer, multiple, recipe.context_length, seed)
        losses = train(model, rows["pre"], schedule, seed, tokenizer.pad_token_id, label=name)
    else:
        model = copy.deepcopy(parent)
        torch.manual_seed(seed)
        frozen = torch.zeros(len(tokenizer), dtype=torch.bool)
        frozen[rows["pre"].unique()] = True  # what pre-training learned stays; new chat words learn
        schedule = recipe.safe_tune if data == "safe" else recipe.chat_tune
        losses = train(model, rows[data], schedule, seed, tokenizer.pad_token_id, mix_rows=rows["pre"], frozen_tokens=frozen, label=name)
    return model, sum(losses[-10:]) / len(losses[-10:])


def _write_world(path: Path, world: World, recipe: Recipe) -> None:
    facts = [{"entity": e, "attribute": a, "value": world.facts[e, a]} for e in world.entities for a in ATTRIBUTES]
    data = {
        "entities": list(world.entities),
        "values": {a: list(v) for a, v in world.values.items()},
        "facts": facts,
        "tuned_entities": list(world.tuned_entities),
        "refused_attribute": recipe.refused_attribute,
    }
    path.write_text(json.dumps(data, indent=1))
