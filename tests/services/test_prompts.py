import pytest
from transformers import AutoTokenizer

from eft_core import InvalidArgumentError
from eft_core import Composition, Delta
from services.prompts import composition_vocab_sizes, render_prompt, stop_token_ids, tokenizer_fingerprint


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


def test_shared_tokenizer_check_is_per_composition(tokenizers, quick_family):
    upscaled = Composition("upscaled", "large-base", (Delta("chat", "small-tuned", "large-base"),))
    assert composition_vocab_sizes([upscaled], tokenizers) == {"upscaled": quick_family.manifest["vocab_size"]}
    other = AutoTokenizer.from_pretrained(quick_family.model_path("small-base"))
    other.add_tokens(["zzz-new-word"])
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizers["large-base"])
    alone = Composition("odd", "odd")
    assert composition_vocab_sizes([upscaled, alone], {**tokenizers, "odd": other}) == {"upscaled": len(tokenizers["large-base"]), "odd": len(other)}
    mixed = Composition("mixed", "large-base", (Delta("chat", "odd", "large-base"),))
    with pytest.raises(InvalidArgumentError, match="must share one") as error:
        composition_vocab_sizes([mixed], {**tokenizers, "odd": other})
    assert error.value.field == "compositions['mixed']"


def test_a_model_without_a_chat_template_sees_a_chat_as_plain_text(bpe_family):
    base, tuned = (AutoTokenizer.from_pretrained(bpe_family.model_path(n)) for n in ("large-base", "small-tuned"))
    assert base.chat_template is None and base.bos_token_id is None  # as a Qwen base checkpoint
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "東京 ?"}]
    assert render_prompt(base, messages) == base("be brief\n\n東京 ?", add_special_tokens=False)["input_ids"]
    assert tuned.decode(render_prompt(tuned, messages)) == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n東京 ?<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(InvalidArgumentError) as error:
        render_prompt(base, [{"role": "user", "content": ""}])
    assert error.value.field == "messages"


def test_a_composition_stops_at_any_of_its_models_end_tokens(bpe_family):
    tokenizers = {n: AutoTokenizer.from_pretrained(bpe_family.model_path(n)) for n in ("large-base", "small-base", "small-tuned")}
    upscaled = Composition("upscaled", "large-base", (Delta("chat", "small-tuned", "small-base"),))
    ends = tokenizers["small-tuned"].convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    assert stop_token_ids(tokenizers, upscaled) == tuple(ends)  # the base ends documents, the chat model its turns
    assert stop_token_ids(tokenizers, Composition("large-base", "large-base")) == (ends[0],)
