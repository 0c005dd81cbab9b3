import random

import pytest

from eft_core import InvalidArgumentError
from eft_core.draft_length import AcceptanceEstimate, best_draft_k, expected_emitted, ideal_speedup


def simulate_step(rng: random.Random, acceptance: float, k: int) -> int:
    """Accepted drafts of one step: each accepted with probability ``acceptance``, until the first rejection."""
    accepted = 0
    while accepted < k and rng.random() < acceptance:
        accepted += 1
    return accepted


@pytest.mark.parametrize("acceptance", [0.0, 0.3, 0.8, 1.0])
@pytest.mark.parametrize("k", [0, 1, 4])
def test_expected_emitted_matches_simulated_steps(acceptance, k):
    rng = random.Random(0)
    mean = sum(simulate_step(rng, acceptance, k) + 1 for _ in range(20000)) / 20000
    assert expected_emitted(acceptance, k) == pytest.approx(sum(acceptance**j for j in range(k + 1)))
    assert mean == pytest.approx(expected_emitted(acceptance, k), abs=0.03)


def test_ideal_speedup_counts_draft_steps_in_scoring_calls():
    assert ideal_speedup(0.0, 0, 0.5) == 1.0  # no drafts: plain decoding
    assert ideal_speedup(1.0, 4, 0.0) == 5.0  # free drafter, all accepted: k + 1 tokens per call
    assert ideal_speedup(0.8, 3, 0.1) == pytest.approx((1 + 0.8 + 0.64 + 0.512) / 1.3)


def test_best_draft_k_grows_with_acceptance_and_shrinks_with_draft_cost():
    ks = [best_draft_k(a / 20, 0.1, 8) for a in range(21)]
    assert ks == sorted(ks) and ks[0] == 1 and ks[-1] == 8
    costs = [best_draft_k(0.85, c, 8) for c in (0.01, 0.05, 0.1, 0.3, 1.0)]
    assert costs == sorted(costs, reverse=True) and costs[0] == 8 and costs[-1] == 1
    for a, c in [(0.6, 0.1), (0.9, 0.05), (0.75, 0.2)]:  # it is the argmax over 1..8
        best = best_draft_k(a, c, 8)
        assert all(ideal_speedup(a, best, c) >= ideal_speedup(a, k, c) for k in range(1, 9))


def test_bad_arguments_name_the_field():
    with pytest.raises(InvalidArgumentError, match="acceptance"):
        expected_emitted(1.5, 2)
    with pytest.raises(InvalidArgumentError, match="max_k"):
        best_draft_k(0.5, 0.1, 0)


@pytest.mark.parametrize("acceptance", [0.2, 0.6, 0.95])
def test_the_acceptance_estimate_recovers_the_true_rate(acceptance):
    rng = random.Random(1)
    exact, running = AcceptanceEstimate(decay=1.0), AcceptanceEstimate()
    for _ in range(3000):
        accepted = simulate_step(rng, acceptance, 4)
        exact.observe(4, accepted)
        running.observe(4, accepted)
    assert exact.rate == pytest.approx(acceptance, abs=0.02)
    assert running.rate == pytest.approx(acceptance, abs=0.3)  # decayed: follows the recent drafts


def test_the_acceptance_estimate_follows_a_change():
    estimate = AcceptanceEstimate()
    for _ in range(30):
        estimate.observe(4, 4)
    high = estimate.rate
    rates = []
    for _ in range(20):
        estimate.observe(4, 0)
        rates.append(estimate.rate)
    assert high > 0.95 and rates == sorted(rates, reverse=True) and rates[9] < 0.5 and rates[-1] < 0.3
