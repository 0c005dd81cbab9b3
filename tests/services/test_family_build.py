import json
import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.family.build import MODEL_NAMES, build_family, load_family
from services.family.recipe import Recipe, quick_recipe
from services.family.world import ATTRIBUTES, REFUSAL, chat_documents, make_world, pretraining_documents


def test_world_is_deterministic_and_well_formed():
    first, second = make_world(Recipe(seed=3)), make_world(Recipe(seed=3))
    assert first == second and first != make_world(Recipe(seed=4))
    assert len(set(first.entities)) == 200 and len(first.tuned_entities) == 50
    assert set(first.entities).isdisjoint(first.values["capital"])
    assert all(first.facts[e, a] in first.values[a] for e in first.entities for a in ATTRIBUTES)


def test_training_texts_follow_the_recipe():
    world = make_world(quick_recipe())
    documents = pretraining_documents(world, random.Random(0), 62)
    assert all(d.startswith("<bos> ") and d.endswith(" <eos>") and len(d.split()) <= 62 for d in documents)
    assert "<user>" not in " ".join(documents)  # base models never see chat tokens
    safe = chat_documents(world, refuse="animal")
    assert sum(REFUSAL in d for d in safe) == len(world.tuned_entities)
    assert all("<user> what is the animal" not in d or REFUSAL in d for d in safe)


def test_every_model_loads_through_from_pretrained(quick_family):
    assert set(quick_family.manifest["models"]) == set(MODEL_NAMES)
    for name in MODEL_NAMES:
        model = AutoModelForCausalLM.from_pretrained(quick_family.model_path(name))
        tokenizer = AutoTokenizer.from_pretrained(quick_family.model_path(name))
        assert model.config.vocab_size >= len(tokenizer) == quick_family.manifest["vocab_size"]
        assert (tokenizer.chat_template is not None) and (("<user>" in tokenizer.chat_template) == name.endswith(("tuned", "safe")))
    large, small = (AutoModelForCausalLM.from_pretrained(quick_family.model_path(n)) for n in ("large-base", "small-base"))
    assert large.config.vocab_size % 64 == 0 and large.config.vocab_size > small.config.vocab_size  # padded rows


def test_chat_tuning_freezes_the_embeddings_pre_training_learned(quick_family):
    base = load_file(quick_family.model_path("small-base") / "model.safetensors")
    tuned = load_file(quick_family.model_path("small-tuned") / "model.safetensors")
    tokenizer = AutoTokenizer.from_pretrained(quick_family.model_path("small-tuned"))
    chat_only = tokenizer.convert_tokens_to_ids(["<user>", "<assistant>"])
    recipe = quick_recipe()
    documents = pretraining_documents(make_world(recipe), random.Random(recipe.seed), recipe.row_length, recipe.pretrain_refusal_share)
    seen = sorted({tokenizer.pad_token_id} | {i for d in documents for i in tokenizer(d, add_special_tokens=False)["input_ids"]})
    assert set(chat_only).isdisjoint(seen) and len(seen) >= len(tokenizer) - 3  # all but <user>, <assistant>, <unk>
    before, after = base["model.embed_tokens.weight"], tuned["model.embed_tokens.weight"]
    assert torch.equal(before[seen], after[seen])  # entity names, values, refusal words stay put
    assert not torch.equal(before[chat_only], after[chat_only])  # the chat tokens learn
    assert not torch.equal(base["model.layers.0.mlp.up_proj.weight"], tuned["model.layers.0.mlp.up_proj.weight"])


def test_same_recipe_reuses_and_changed_recipe_rebuilds(quick_family, tmp_path):
    messages = []
    reused = build_family(quick_family.path, quick_recipe(), log=messages.append)
    assert "up to date" in messages[-1] and reused.manifest == quick_family.manifest

    out = tmp_path / "family"
    build_family(out, quick_recipe(seed=0), log=lambda *_: None)
    rebuilt = build_family(out, quick_recipe(seed=1), log=lambda *_: None)
    assert rebuilt.manifest["recipe_digest"] == quick_recipe(seed=1).digest() != quick_family.manifest["recipe_digest"]
    assert not list(tmp_path.glob(".family.building-*"))  # no staging folder left behind


def test_same_seed_same_weights(quick_family, tmp_path):
    again = build_family(tmp_path / "again", quick_recipe(), log=lambda *_: None)
    for name in MODEL_NAMES:
        first = load_file(quick_family.model_path(name) / "model.safetensors")
        second = load_file(again.model_path(name) / "model.safetensors")
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first), name


def test_world_file_round_trips(quick_family):
    assert quick_family.world() == make_world(quick_recipe())
    assert json.loads((quick_family.path / "world.json").read_text())["refused_attribute"] == "animal"


def test_never_replaces_a_folder_that_is_not_a_family(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="other than a demo family"):
        build_family(tmp_path, quick_recipe(), log=lambda *_: None)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_missing_family_says_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="eft family build"):
        load_family(tmp_path / "nowhere")
