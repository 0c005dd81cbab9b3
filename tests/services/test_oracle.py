import pytest
import torch

from eft_core import Composition, Delta, NotFoundError, SamplingParams
from services.family.compositions import family_compositions
from services.family.evaluate import open_engine
from services.oracle import CachedLogitsSource, OracleEngine


@pytest.fixture(scope="module")
def engine(quick_family):
    family = open_engine(quick_family)
    # base = reference with weight 1: must be exactly the tuned model
    identity = Composition("identity", "small-base", (Delta("chat", "small-tuned", "small-base"),))
    return OracleEngine(family.models, {**family.compositions, "identity": identity})


@pytest.fixture(scope="module")
def questions(quick_family):
    world = quick_family.world()
    return [[{"role": "user", "content": f"what is the {a} of {e} ?"}] for e in world.entities[:4] for a in world.values]


GREEDY = SamplingParams(temperature=0, max_tokens=10)


def test_cached_source_matches_a_full_forward_through_extends_and_rollbacks(quick_family):
    model = open_engine(quick_family).models["large-base"].model
    prompt = [1, 7, 8, 9]
    source = CachedLogitsSource(model, prompt)
    for generated in ([], [5], [5, 6, 7], [5], [5, 9, 9, 9], [], [3]):  # grow, roll back, regrow
        full = model(input_ids=torch.tensor([prompt + generated])).logits[0, -1]
        torch.testing.assert_close(source(generated), full, rtol=1e-5, atol=1e-5)
    assert source.cached == prompt + [3]


def test_zero_weights_give_the_base_models_own_greedy_output(engine, questions):
    for messages in questions:
        upscaled = engine.generate("upscaled", messages, GREEDY, weights={"chat": 0.0})
        base = engine.generate("large-base", messages, GREEDY)
        assert upscaled.generation.tokens == base.generation.tokens


def test_base_equal_to_reference_gives_the_tuned_models_greedy_output(engine, questions):
    for messages in questions:
        identity = engine.generate("identity", messages, GREEDY)
        tuned = engine.generate("small-tuned", messages, GREEDY)
        assert identity.generation.tokens == tuned.generation.tokens
        assert identity.prompt_ids["small-base"] != identity.prompt_ids["small-tuned"]  # own templates


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_greedy_equals_greedy(engine, questions, k):
    for messages in questions:
        for composition in ("upscaled", "mixed"):
            plain = engine.generate(composition, messages, GREEDY)
            speculative = engine.generate(composition, messages, GREEDY, draft_k=k)
            assert speculative.generation.tokens == plain.generation.tokens
            assert speculative.text == plain.text


def test_seeded_sampling_is_reproducible(engine, questions):
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=10)
    for draft_k in (0, 2):
        runs = [engine.generate("upscaled", questions[0], params, draft_k=draft_k).generation.tokens for _ in range(2)]
        assert runs[0] == runs[1]
    different = {tuple(engine.generate("upscaled", questions[0], SamplingParams(seed=s, max_tokens=10)).generation.tokens) for s in range(8)}
    assert len(different) > 1


def test_generation_stops_at_eos_and_text_drops_special_tokens(engine, questions):
    result = engine.generate("small-tuned", questions[0], SamplingParams(temperature=0, max_tokens=40))
    eos = engine.tokenizers["small-tuned"].eos_token_id
    if result.generation.finish_reason == "stop":
        assert result.generation.tokens[-1] == eos and "<eos>" not in result.text
    else:
        assert len(result.generation.tokens) == 40 and eos not in result.generation.tokens


def test_unknown_composition_is_not_found(engine, questions):
    with pytest.raises(NotFoundError) as error:
        engine.generate("nope", questions[0], GREEDY)
    assert error.value.field == "composition"


def test_family_compositions_match_the_paper():
    compositions = family_compositions(mixing_lambda=0.3)
    assert compositions["upscaled"].base == "large-base"
    assert [(d.tuned, d.reference, d.weight) for d in compositions["upscaled"].deltas] == [("small-tuned", "small-base", 1.0)]
    assert [(d.tuned, d.weight) for d in compositions["mixed"].deltas] == [("small-tuned", 0.3), ("small-safe", 0.7)]
    assert compositions["upscaled"].drafter_model == "small-tuned"
