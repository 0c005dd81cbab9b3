import itertools

import pytest
import torch

from eft_core import Composition, InvalidArgumentError, SamplingParams, eft_logprobs, generate, implicit_rewards
from tests.eft_core.helpers import ToyModel, perturbed, toy_family, tv_distance, upscaling

VOCAB = 16


def greedy(max_tokens=24, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kwargs)


# --- greedy: speculation changes nothing -----------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("family_seed", [0, 1, 2])
@pytest.mark.parametrize("weight", [1.0, 1.5])
def test_greedy_speculative_equals_greedy_token_for_token(k, family_seed, weight):
    sources = toy_family(VOCAB, seed=family_seed, padding=3)
    plain = generate(sources, upscaling(weight), greedy(), vocab_size=VOCAB)
    speculative = generate(sources, upscaling(weight), greedy(), vocab_size=VOCAB, draft_k=k)
    assert speculative.tokens == plain.tokens
    assert speculative.logprobs == plain.logprobs
    assert speculative.rewards == plain.rewards
    assert len(plain.tokens) == 24 and plain.finish_reason == speculative.finish_reason == "length"
    assert 0 < speculative.stats.drafts and speculative.stats.draft_tokens >= speculative.stats.accepted_tokens


def test_greedy_speculative_equals_greedy_with_conservative_top_p_and_stop_tokens():
    sources = toy_family(VOCAB, seed=4)
    params = greedy(max_tokens=40, top_p=0.5, conservative_top_p=True, stop_token_ids=(3,))
    plain = generate(sources, upscaling(), params)
    speculative = generate(sources, upscaling(), params, draft_k=4)
    assert speculative.tokens == plain.tokens
    assert plain.finish_reason == "stop" and plain.tokens[-1] == 3 and 3 not in plain.tokens[:-1]


def test_a_drafter_equal_to_the_target_is_always_accepted():
    sources = toy_family(VOCAB)
    alone = Composition("small-tuned", "small_tuned", drafter="small_tuned")
    result = generate(sources, alone, greedy(max_tokens=21), draft_k=4)
    assert result.stats.acceptance_rate == 1.0
    assert result.stats.drafts == 4 and result.stats.accepted_per_position == [4, 4, 4, 4]  # 4 x (4 + bonus) + 1


# --- sampling: the sequence distribution is exactly EFT's ------------------------------------


def exact_sequence_distribution(sources, composition, vocab, length) -> dict[tuple[int, ...], float]:
    """P(sequence) = prod_t p_eft(x_t | x_<t), by enumeration, straight from the formula."""
    def step_probs(prefix):
        logits = {m: sources[m](list(prefix))[None, None] for m in composition.scored_models}
        return eft_logprobs(logits, composition)[0, 0].double().exp()

    out = {}
    for sequence in itertools.product(range(vocab), repeat=length):
        probability = 1.0
        for t in range(length):
            probability *= float(step_probs(sequence[:t])[sequence[t]])
        out[sequence] = probability
    return out


@pytest.mark.parametrize("draft_k", [0, 2])
def test_sampled_sequences_follow_the_exact_eft_distribution(draft_k):
    vocab, length, runs = 3, 3, 3000
    sources = {
        "large": ToyModel(1, vocab, prompt=(1,), scale=0.8),
        "small_tuned": ToyModel(2, vocab, prompt=(5, 1), scale=0.8),
        "small": ToyModel(3, vocab, prompt=(1,), scale=0.8),
    }
    composition = upscaling(1.0)
    exact = exact_sequence_distribution(sources, composition, vocab, length)
    sequences = list(exact)
    target = torch.tensor([exact[s] for s in sequences], dtype=torch.float32)
    wrong = perturbed(target, seed=3, size=0.6)
    counts = torch.zeros(len(sequences))
    for seed in range(runs):
        result = generate(sources, composition, SamplingParams(seed=seed, max_tokens=length), draft_k=draft_k)
        counts[sequences.index(tuple(result.tokens))] += 1
    assert float(tv_distance(counts, target)) < 0.05
    assert float(tv_distance(counts, wrong)) > 2 * float(tv_distance(counts, target))


# --- outputs and controls --------------------------------------------------------------------


def test_same_seed_same_tokens_with_and_without_speculation():
    sources = toy_family(VOCAB, seed=7)
    for draft_k in (0, 3):
        params = SamplingParams(temperature=0.8, top_k=8, seed=42, max_tokens=20)
        first = generate(sources, upscaling(), params, draft_k=draft_k)
        second = generate(sources, upscaling(), params, draft_k=draft_k)
        other = generate(sources, upscaling(), SamplingParams(temperature=0.8, top_k=8, seed=43, max_tokens=20), draft_k=draft_k)
        assert first.tokens == second.tokens and first.tokens != other.tokens


def test_logprobs_and_rewards_are_those_of_the_emitted_tokens():
    sources = toy_family(VOCAB, seed=8)
    result = generate(sources, upscaling(1.5), SamplingParams(seed=1, max_tokens=6), draft_k=2)
    for t, token in enumerate(result.tokens):
        logits = {m: sources[m](result.tokens[:t])[None, None] for m in ("large", "small_tuned", "small")}
        expected_logprob = eft_logprobs(logits, upscaling(1.5))[0, 0, token]
        expected_reward = implicit_rewards(logits, upscaling(1.5), torch.tensor([[token]]))[0, 0]
        assert result.logprobs[t] == pytest.approx(float(expected_logprob), abs=1e-6)
        assert result.rewards[t] == pytest.approx(expected_reward.tolist(), abs=1e-6)


def test_per_request_weights_override_the_composition():
    sources = toy_family(VOCAB, seed=9)
    base_only = generate(sources, Composition("large", "large"), greedy())
    zero_delta = generate(sources, upscaling(), greedy(), weights={"chat": 0.0})
    default = generate(sources, upscaling(), greedy())
    assert zero_delta.tokens == base_only.tokens != default.tokens
    assert zero_delta.rewards != [[0.0]] * 24  # rewards still reported for a zero-weight delta


def test_max_tokens_bounds_speculative_output_exactly():
    sources = toy_family(VOCAB)
    alone = Composition("small-tuned", "small_tuned", drafter="small_tuned")
    for max_tokens in (1, 2, 5, 7):
        result = generate(sources, alone, greedy(max_tokens=max_tokens), draft_k=5)
        assert len(result.tokens) == max_tokens and result.finish_reason == "length"


# --- bad input -------------------------------------------------------------------------------


def test_negative_k_is_refused():
    with pytest.raises(InvalidArgumentError) as error:
        generate(toy_family(VOCAB), upscaling(), greedy(), draft_k=-1)
    assert error.value.field == "draft_k"


def test_missing_source_names_the_model():
    sources = toy_family(VOCAB)
    del sources["small"]
    with pytest.raises(InvalidArgumentError) as error:
        generate(sources, upscaling(), greedy())
    assert error.value.field == "sources['small']"


def test_missing_drafter_source_is_refused_only_when_speculating():
    sources = toy_family(VOCAB)
    composition = upscaling(drafter="tiny")
    assert len(generate(sources, composition, greedy(max_tokens=3)).tokens) == 3
    with pytest.raises(InvalidArgumentError) as error:
        generate(sources, composition, greedy(), draft_k=2)
    assert error.value.field == "sources['tiny']"


def test_a_source_returning_the_wrong_shape_is_named():
    sources = dict(toy_family(VOCAB), large=lambda generated: torch.zeros(2, VOCAB))
    with pytest.raises(InvalidArgumentError) as error:
        generate(sources, upscaling(), greedy())
    assert error.value.field == "sources['large']"
