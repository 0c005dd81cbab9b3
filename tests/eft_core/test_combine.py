import math

import pytest
import torch

from eft_core import Composition, Delta, InvalidArgumentError, eft_logprobs, implicit_rewards, model_coefficients
from tests.eft_core.helpers import seeded, upscaling

LN2, LN3 = math.log(2.0), math.log(3.0)


def logits_of(*rows: list[float]) -> torch.Tensor:  # [1, positions, vocab]
    return torch.tensor([rows], dtype=torch.float32)


def random_logits(models, batch=2, positions=3, vocab=11, seed=0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    return {m: (3 * torch.randn(batch, positions, vocab, generator=seeded(seed + i))).to(dtype) for i, m in enumerate(models)}


# --- literal cases, checked against hand-computed numbers ------------------------------------


def test_literal_uniform_base_takes_the_tuned_over_reference_ratio():
    # p_base = p_ref = uniform, p_tuned = [1/2, 1/4, 1/4]  ->  p_eft = p_tuned
    logits = {"large": logits_of([0, 0, 0]), "small_tuned": logits_of([LN2, 0, 0]), "small": logits_of([0, 0, 0])}
    probs = eft_logprobs(logits, upscaling(1.0)).exp()
    torch.testing.assert_close(probs[0, 0], torch.tensor([1 / 2, 1 / 4, 1 / 4]))
    # weight 2 squares the ratio [3/2, 3/4, 3/4]: p ∝ [4, 1, 1]
    probs = eft_logprobs(logits, upscaling(2.0)).exp()
    torch.testing.assert_close(probs[0, 0], torch.tensor([4 / 6, 1 / 6, 1 / 6]))
    # weight 0.5 takes its square root: p ∝ [sqrt 2, 1, 1]
    probs = eft_logprobs(logits, upscaling(0.5)).exp()
    torch.testing.assert_close(probs[0, 0], torch.tensor([2**0.5, 1, 1]) / (2 + 2**0.5))


def test_literal_knowledge_from_base_behaviour_from_delta():
    # p_base = [3, 1, 1]/5; p_tuned / p_ref = [1, 2, 1/2]  ->  p_eft ∝ [3, 2, 1/2] = [6, 4, 1]/11
    logits = {"large": logits_of([LN3, 0, 0]), "small_tuned": logits_of([0, LN2, 0]), "small": logits_of([0, 0, LN2])}
    probs = eft_logprobs(logits, upscaling(1.0)).exp()
    torch.testing.assert_close(probs[0, 0], torch.tensor([6 / 11, 4 / 11, 1 / 11]))


def test_literal_implicit_reward_is_the_tuned_over_reference_log_ratio():
    logits = {"large": logits_of([LN3, 0, 0]), "small_tuned": logits_of([0, LN2, 0]), "small": logits_of([0, 0, LN2])}
    rewards = implicit_rewards(logits, upscaling(), torch.tensor([[1]]))
    torch.testing.assert_close(rewards, torch.tensor([[[LN2]]]))
    rewards = implicit_rewards(logits, upscaling(), torch.tensor([[2]]))
    torch.testing.assert_close(rewards, torch.tensor([[[-LN2]]]))


# --- identities, exact to the bit ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_weights_zero_is_exactly_the_base(dtype):
    composition = Composition("c", "large", (Delta("a", "t1", "small"), Delta("b", "t2", "small")))
    logits = random_logits(["large", "t1", "small", "t2"], dtype=dtype)
    out = eft_logprobs(logits, composition, [0.0, 0.0])
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.log_softmax(logits["large"].float(), dim=-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_base_equal_to_reference_with_weight_one_is_exactly_the_tuned(dtype):
    composition = Composition("c", "small", (Delta("chat", "small_tuned", "small", 1.0),))
    logits = random_logits(["small", "small_tuned"], dtype=dtype)
    out = eft_logprobs(logits, composition)
    assert torch.equal(out, torch.log_softmax(logits["small_tuned"].float(), dim=-1))


def test_zero_weight_ignores_minus_infinity_in_an_unused_model():
    logits = random_logits(["large", "small_tuned", "small"])
    logits["small_tuned"][..., 0] = -math.inf
    out = eft_logprobs(logits, upscaling(0.0))
    assert torch.equal(out, torch.log_softmax(logits["large"], dim=-1))


def test_coefficients_gather_terms_per_distinct_model():
    composition = Composition("c", "small", (Delta("a", "t", "small"), Delta("b", "t", "small")))
    coefficients = model_coefficients(composition, torch.tensor([[0.25, 0.75]]))
    assert coefficients.tolist() == [[0.0, 1.0]]  # small: 1 - 0.25 - 0.75; t: 0.25 + 0.75


# --- the formula itself ----------------------------------------------------------------------


def reference_formula(logits, base, deltas) -> torch.Tensor:
    """DESIGN.md 2, written directly with log_softmax per model."""
    lsm = {m: torch.log_softmax(t.float(), dim=-1) for m, t in logits.items()}
    z = lsm[base] + sum(w * (lsm[t] - lsm[r]) for t, r, w in deltas)
    return torch.log_softmax(z, dim=-1)


@pytest.mark.parametrize("weight", [-0.5, 0.5, 1.0, 1.5, 3.0])
def test_matches_the_formula_with_normalised_logprobs(weight):
    logits = random_logits(["large", "small_tuned", "small"], seed=3)
    expected = reference_formula(logits, "large", [("small_tuned", "small", weight)])
    torch.testing.assert_close(eft_logprobs(logits, upscaling(weight)), expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("lam", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_two_deltas_with_lambda_and_one_minus_lambda_interpolate(lam):
    mixed = Composition("mixed", "large", (Delta("help", "chat", "small", lam), Delta("safe", "safe", "small", 1 - lam)))
    logits = random_logits(["large", "chat", "small", "safe"], seed=5)
    expected = reference_formula(logits, "large", [("chat", "small", lam), ("safe", "small", 1 - lam)])
    out = eft_logprobs(logits, mixed)
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-5)
    # the un-normalised scores are linear in lambda: mix of the two pure compositions
    only_help = eft_logprobs(logits, Composition("h", "large", (Delta("help", "chat", "small"),)))
    only_safe = eft_logprobs(logits, Composition("s", "large", (Delta("safe", "safe", "small"),)))
    torch.testing.assert_close(out, torch.log_softmax(lam * only_help + (1 - lam) * only_safe, -1), rtol=0, atol=2e-5)
    if lam in (0.0, 1.0):  # endpoints are the pure compositions
        torch.testing.assert_close(out, only_help if lam == 1.0 else only_safe, rtol=0, atol=1e-6)


def test_per_row_weights_are_per_request():
    logits = random_logits(["large", "small_tuned", "small"], batch=3)
    out = eft_logprobs(logits, upscaling(), torch.tensor([[0.0], [1.0], [2.0]]))
    for row, weight in enumerate([0.0, 1.0, 2.0]):
        alone = eft_logprobs({m: t[row : row + 1] for m, t in logits.items()}, upscaling(weight))
        assert torch.equal(out[row : row + 1], alone)


# --- vocabularies ----------------------------------------------------------------------------


def test_padded_vocabularies_combine_on_the_shared_part():
    logits = random_logits(["large", "small_tuned", "small"], vocab=10)
    padded = dict(logits, large=torch.cat([logits["large"], torch.full((2, 3, 2), 9.0)], dim=-1))  # 12 rows
    out = eft_logprobs(padded, upscaling(), vocab_size=10)
    assert out.shape == (2, 3, 10)
    assert torch.equal(out, eft_logprobs(logits, upscaling()))


def test_a_model_smaller_than_the_vocabulary_is_refused():
    logits = random_logits(["large", "small_tuned", "small"], vocab=12)
    logits["small"] = logits["small"][..., :9]
    with pytest.raises(InvalidArgumentError, match="fewer than the shared vocabulary's 10") as error:
        eft_logprobs(logits, upscaling(), vocab_size=10)
    assert error.value.field == "logits['small']"


def test_different_widths_without_a_vocab_size_are_refused():
    logits = random_logits(["large", "small_tuned", "small"], vocab=10)
    logits["large"] = torch.cat([logits["large"], logits["large"][..., :2]], dim=-1)
    with pytest.raises(InvalidArgumentError, match="pass vocab_size"):
        eft_logprobs(logits, upscaling())


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights, field",
    [([math.nan], "weights"), ([math.inf], "weights"), ([1.0, 2.0], "weights"), (torch.ones(3, 1), "weights")],
)
def test_bad_weights_are_refused(weights, field):
    with pytest.raises(InvalidArgumentError) as error:
        eft_logprobs(random_logits(["large", "small_tuned", "small"]), upscaling(), weights)
    assert error.value.field == field


def test_shape_mismatch_names_the_model():
    logits = random_logits(["large", "small_tuned", "small"])
    logits["small_tuned"] = logits["small_tuned"][:, :2]
    with pytest.raises(InvalidArgumentError, match="disagrees") as error:
        eft_logprobs(logits, upscaling())
    assert error.value.field == "logits['small_tuned']"


def test_missing_model_names_the_model():
    logits = random_logits(["large", "small"])
    with pytest.raises(InvalidArgumentError) as error:
        eft_logprobs(logits, upscaling())
    assert error.value.field == "logits['small_tuned']"


def test_wrong_rank_names_the_model():
    logits = random_logits(["large", "small_tuned", "small"])
    logits["large"] = logits["large"][0]
    with pytest.raises(InvalidArgumentError, match=r"\[batch, positions, vocab\]") as error:
        eft_logprobs(logits, upscaling())
    assert error.value.field == "logits['large']"
