import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eft_core import InvalidArgumentError, SamplingBatch, SamplingParams, sample, sampling_probs
from eft_core.sampling import TOP_P_CANDIDATES, seeded_generator, stream_seed, top_k_mask, top_p_mask, top_p_mask_by_sort
from tests.eft_core.helpers import perturbed, seeded, tv_distance


def batch_of(*params: SamplingParams) -> SamplingBatch:
    return SamplingBatch.from_params(list(params))


def expected_probs(logprobs: list[float], temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then top-p on the renormalised rest, written out plainly."""
    weights = [math.exp(lp / temperature) for lp in logprobs]
    order = sorted(range(len(weights)), key=lambda i: -weights[i])
    kept = order[:top_k] if top_k else order
    total, mass, nucleus = sum(weights[i] for i in kept), 0.0, []
    for i in kept:
        if mass >= top_p:
            break
        nucleus.append(i)
        mass += weights[i] / total
    out = torch.zeros(len(weights), dtype=torch.float64)
    for i in nucleus:
        out[i] = weights[i]
    return (out / out.sum()).float()


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(temperature=math.inf), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.01), "top_p"),
        (dict(top_p=math.nan), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(seed=-1), "seed"),
        (dict(seed=2**64), "seed"),
        (dict(stop_token_ids=(3, -2)), "stop_token_ids[1]"),
        (dict(conservative_top_p="yes"), "conservative_top_p"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidArgumentError) as error:
        SamplingParams(**kwargs)
    assert error.value.field == field


# --- literal cases ---------------------------------------------------------------------------


def test_greedy_takes_the_argmax_and_reports_its_logprob():
    logprobs = torch.log_softmax(torch.tensor([[0.1, 2.0, 0.3], [1.0, 0.0, 3.0]]), dim=-1)
    tokens, chosen = sample(logprobs, batch_of(SamplingParams(temperature=0), SamplingParams(temperature=0)))
    assert tokens.tolist() == [1, 2]
    assert torch.equal(chosen, logprobs[[0, 1], [1, 2]])


def test_top_k_and_top_p_literal():
    logprobs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    probs = sampling_probs(logprobs, batch_of(SamplingParams(top_k=2)))
    torch.testing.assert_close(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    probs = sampling_probs(logprobs, batch_of(SamplingParams(top_p=0.8)))  # 0.5 + 0.3 reaches 0.8
    torch.testing.assert_close(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    probs = sampling_probs(logprobs, batch_of(SamplingParams(top_p=0.81)))  # needs the third token
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)


def test_temperature_literal():
    logprobs = torch.tensor([[0.8, 0.2]]).log()
    probs = sampling_probs(logprobs, batch_of(SamplingParams(temperature=0.5)))  # p^2 renormalised
    torch.testing.assert_close(probs, torch.tensor([[0.64, 0.04]]) / 0.68)


def test_conservative_top_p_takes_the_nucleus_from_the_other_distribution():
    target = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log()
    small_tuned = torch.tensor([[0.6, 0.3, 0.05, 0.05]]).log()  # its 0.85-nucleus: tokens 0 and 1
    params = SamplingParams(top_p=0.85, conservative_top_p=True)
    probs = sampling_probs(target, batch_of(params), nucleus_logprobs=small_tuned)
    torch.testing.assert_close(probs, torch.tensor([[1 / 3, 2 / 3, 0.0, 0.0]]))
    # greedy with the conservative nucleus: the target's best token inside the nucleus
    greedy = SamplingParams(temperature=0, top_p=0.85, conservative_top_p=True)
    tokens, _ = sample(target, batch_of(greedy), nucleus_logprobs=small_tuned)
    assert tokens.tolist() == [1]
    # without the flag the row uses its own nucleus
    probs = sampling_probs(target, batch_of(SamplingParams(top_p=0.85)), nucleus_logprobs=small_tuned)
    assert probs[0].nonzero().flatten().tolist() == [1, 2, 3]


# --- statistical: samples converge to the exact target ---------------------------------------


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.8), (0.8, 6, 0.9)],
)
def test_samples_converge_to_the_target_faster_than_to_a_perturbed_one(temperature, top_k, top_p):
    vocab, n = 12, 40_000
    logprobs = torch.log_softmax(2 * torch.randn(vocab, generator=seeded(11)), dim=-1)
    target = expected_probs(logprobs.tolist(), temperature, top_k, top_p)
    wrong = perturbed(target, seed=12)
    assert float(tv_distance(target, wrong)) > 0.03  # the wrong target is really wrong

    torch.manual_seed(0)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    tokens, _ = sample(logprobs.expand(n, vocab), SamplingBatch.from_params([params] * n))
    distances = {}
    for count in (400, 4_000, 40_000):
        histogram = torch.bincount(tokens[:count], minlength=vocab).float()
        distances[count] = (float(tv_distance(histogram, target)), float(tv_distance(histogram, wrong)))
    (near_small, _), (near_large, wrong_large) = distances[400], distances[40_000]
    assert near_large < near_small / 3, distances  # converges (expected ~ 1/sqrt(n): 10x)
    assert near_large < wrong_large / 3, distances  # and to the target, not a neighbour
    assert torch.all(torch.bincount(tokens, minlength=vocab)[target == 0] == 0)  # filtered never sampled


# --- seeds -----------------------------------------------------------------------------------


def test_a_seeded_row_does_not_depend_on_its_batch_mates():
    vocab, steps = 20, 30
    logprobs = torch.log_softmax(torch.randn(steps, 4, vocab, generator=seeded(1)), dim=-1)
    mine = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    alone = SamplingBatch.from_params([mine])
    crowded = SamplingBatch.from_params([SamplingParams(), SamplingParams(seed=7, top_k=3), mine, SamplingParams(temperature=0)])
    solo_tokens, batch_tokens = [], []
    for step in range(steps):
        solo_tokens.append(int(sample(logprobs[step, 2:3], alone)[0][0]))
        batch_tokens.append(int(sample(logprobs[step], crowded)[0][2]))
    assert solo_tokens == batch_tokens
    assert len(set(solo_tokens)) > 5  # really sampled, not a constant


def test_same_seed_same_tokens_and_different_seed_different_tokens():
    logprobs = torch.log_softmax(torch.randn(64, 50, generator=seeded(2)), dim=-1)

    def run(seed):
        return sample(logprobs, SamplingBatch.from_params([SamplingParams(seed=seed)] * 64))[0].tolist()

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_a_requests_streams_are_distinct_and_reproducible():
    """The drafter's stream is derived from the request's seed, never equal to the coordinator's."""
    seeds = [0, 1, 5, 2**63 - 1]
    assert [stream_seed(s, "draft") for s in seeds] == [stream_seed(s, "draft") for s in seeds]
    assert all(0 <= stream_seed(s, "draft") < 2**63 and stream_seed(s, "draft") != s for s in seeds)
    for seed in seeds:
        coordinator, drafter = torch.rand(1000, generator=seeded_generator(seed)), torch.rand(1000, generator=seeded_generator(stream_seed(seed, "draft")))
        assert abs(float(torch.corrcoef(torch.stack([coordinator, drafter]))[0, 1])) < 0.15  # independent draws, not the same numbers


# --- properties ------------------------------------------------------------------------------


def largest(values: torch.Tensor, empty: float) -> float:
    return float(values.max()) if values.numel() else empty


logit_rows = st.lists(st.floats(-30, 30, allow_nan=False, width=32), min_size=2, max_size=40)


@given(
    logits=logit_rows,
    temperature=st.one_of(st.just(0.0), st.floats(0.05, 5.0)),
    top_k=st.integers(0, 50),
    top_p=st.floats(0.01, 1.0),
)
def test_sampling_probs_are_finite_and_sum_to_one(logits, temperature, top_k, top_p):
    logprobs = torch.log_softmax(torch.tensor([logits]), dim=-1)
    probs = sampling_probs(logprobs, batch_of(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)))
    assert torch.isfinite(probs).all() and (probs >= 0).all()
    assert abs(float(probs.sum()) - 1.0) < 1e-5
    if top_k:
        assert int((probs > 0).sum()) <= top_k


@given(logits=logit_rows, top_k=st.integers(1, 50))
def test_top_k_keeps_exactly_k(logits, top_k):
    logits = torch.tensor([logits])
    keep = top_k_mask(logits, torch.tensor([top_k]))
    assert int(keep.sum()) == min(top_k, logits.shape[-1])
    assert float(logits[keep].min()) >= largest(logits[~keep], -math.inf)  # the largest ones


@given(logits=logit_rows, top_p=st.floats(0.01, 0.999))
def test_top_p_keeps_the_smallest_set_reaching_p(logits, top_p):
    logprobs = torch.log_softmax(torch.tensor([logits], dtype=torch.float32), dim=-1)
    keep = top_p_mask(logprobs, torch.tensor([top_p]))[0]
    probs = logprobs[0].double().exp()
    kept = probs[keep]
    assert float(kept.sum()) >= top_p - 1e-5  # reaches p
    assert float(kept.sum() - kept.min()) < top_p + 1e-5  # dropping its least likely member would not
    assert float(kept.min()) >= largest(probs[~keep], 0.0) - 1e-7  # most probable first


@settings(max_examples=300, deadline=None)
@given(
    rows=st.integers(1, 4),
    vocab=st.integers(2, 3000),
    scale=st.floats(0.0, 12.0),
    ties=st.booleans(),
    masked=st.booleans(),
    seed=st.integers(0, 2**31),
    top_p=st.lists(st.floats(0.01, 1.0), min_size=4, max_size=4),
)
def test_top_p_from_candidates_is_the_sorted_mask_bit_for_bit(rows, vocab, scale, ties, masked, seed, top_p):
    """Candidates settle most rows (peaked), the full sort the rest (flat, or a nucleus ending in a run of ties)."""
    logits = torch.randn(rows, vocab, generator=seeded(seed)) * scale
    if ties:
        logits = logits.round()
    if masked:
        logits[:, ::2] = -math.inf
    p = torch.tensor(top_p[:rows])
    assert torch.equal(top_p_mask(logits, p), top_p_mask_by_sort(logits, p))


def test_top_p_candidates_settle_a_peaked_row_and_the_sort_a_flat_one():
    peaked = torch.full((1, 5000), -10.0)
    peaked[0, :20] = torch.linspace(5, 1, 20)
    flat = torch.zeros(1, 5000)
    for logits in (peaked, flat):
        assert torch.equal(top_p_mask(logits, torch.tensor([0.9])), top_p_mask_by_sort(logits, torch.tensor([0.9])))
    assert int(top_p_mask(peaked, torch.tensor([0.9])).sum()) < TOP_P_CANDIDATES[0]
    assert int(top_p_mask(flat, torch.tensor([0.9])).sum()) > TOP_P_CANDIDATES[-1]
