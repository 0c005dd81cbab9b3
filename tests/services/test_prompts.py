import pytest
from transformers import AutoTokenizer

from eft_core import InvalidArgumentError
from services.prompts import check_shared_tokenizer, render_prompt, tokenizer_fingerprint


@pytest.fixture(scope="module")
def tokenizers(quick_family):
    return {name: AutoTokenizer.from_pretrained(quick_family.model_path(name)) for name in ("small-tuned", "large-base")}


def tokens(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens(ids)


def test_chat_messages_render_in_each_models_own_form(tokenizers, quick_family):
    entity = quick_family.world().entities[0]
    messages = [{"role": "user", "content": f"what is the capital of {entity} ?"}]
    tuned = tokens(tokenizers["small-tuned"], render_prompt(tokenizers["small-tuned"], messages))
    base = tokens(tokenizers["large-base"], render_prompt(tokenizers["large-base"], messages))
    assert tuned == ["<bos>", "<user>", "what", "is", "the", "capital", "of", entity, "?", "<assistant>"]
    assert base == ["<bos>", "what", "is", "the", "capital", "of", entity, "?"]  # its pre-training form


def test_multi_turn_chat_closes_assistant_turns(tokenizers, quick_family):
    e = quick_family.world().entities[1]
    messages = [
        {"role": "user", "content": f"what is the color of {e} ?"},
        {"role": "assistant", "content": f"the color of {e} is red ."},
        {"role": "user", "content": f"what is the animal of {e} ?"},
    ]
    rendered = tokens(tokenizers["small-tuned"], render_prompt(tokenizers["small-tuned"], messages))
    assert rendered.count("<assistant>") == 2 and rendered.count("<eos>") == 1 and rendered[-1] == "<assistant>"


def test_plain_text_is_tokenised_identically_for_every_model(tokenizers):
    ids = {name: render_prompt(t, "the capital of") for name, t in tokenizers.items()}
    assert ids["small-tuned"] == ids["large-base"]
    assert tokens(tokenizers["large-base"], ids["large-base"]) == ["<bos>", "the", "capital", "of"]


@pytest.mark.parametrize(
    "prompt, field",
    [
        ("", "prompt"),
        ([], "messages"),
        ([{"role": "robot", "content": "hi"}], "messages[0].role"),
        ([{"role": "user", "content": 3}], "messages[0].content"),
        ([{"role": "user", "content": "a"}, "b"], "messages[1]"),
    ],
)
def test_bad_prompts_name_the_field(tokenizers, prompt, field):
    with pytest.raises(InvalidArgumentError) as error:
        render_prompt(tokenizers["small-tuned"], prompt)
    assert error.value.field == field


def test_shared_tokenizer_check(tokenizers, quick_family):
    assert check_shared_tokenizer(tokenizers) == quick_family.manifest["vocab_size"]
    other = AutoTokenizer.from_pretrained(quick_family.model_path("small-base"))
    other.add_tokens(["zzz-new-word"])
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizers["large-base"])
    with pytest.raises(InvalidArgumentError, match="must share one tokenizer") as error:
        check_shared_tokenizer({**tokenizers, "odd": other})
    assert error.value.field == "models['odd'].tokenizer"
