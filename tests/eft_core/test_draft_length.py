import random

import pytest

from eft_core import InvalidArgumentError
from eft_core.draft_length import DraftLengthTuner, expected_emitted, ideal_speedup


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


def test_bad_arguments_name_the_field():
    with pytest.raises(InvalidArgumentError, match="acceptance"):
        expected_emitted(1.5, 2)
    with pytest.raises(InvalidArgumentError, match="draft_cost"):
        ideal_speedup(0.5, 2, -1.0)


def run_tuner(tuner: DraftLengthTuner, throughput, iterations: int, context=("upscaled", True, 1)) -> list[int]:
    """The ks the tuner chose, each iteration's tokens/s given by ``throughput(k)`` (+-5% noise)."""
    rng, chosen = random.Random(2), []
    for _ in range(iterations):
        k = tuner.choose(context)
        tuner.observe(context, k, tokens=100, seconds=100 / (throughput(k) * rng.uniform(0.95, 1.05)))
        chosen.append(k)
    return chosen


@pytest.mark.parametrize("best, curve", [(3, {0: 100, 1: 125, 2: 140, 3: 150, 4: 141, 6: 120, 8: 100}), (0, {0: 100, 1: 80, 2: 70, 3: 60, 4: 50, 6: 40, 8: 30}), (8, {0: 50, 1: 60, 2: 70, 3: 80, 4: 90, 6: 100, 8: 130})])
def test_the_tuner_climbs_to_the_fastest_k_and_stays(best, curve):
    chosen = run_tuner(DraftLengthTuner(), curve.get, 200)
    assert chosen[0] == 4 and chosen[-50:].count(best) >= 40, chosen  # explores a neighbour every 8th iteration
    assert sum(curve[k] for k in chosen) / len(chosen) >= 0.95 * curve[best]  # the climb and the probes cost under 5%


def test_the_tuner_follows_a_change_of_load():
    tuner, context = DraftLengthTuner(), ("upscaled", True, 5)
    run_tuner(tuner, {0: 100, 1: 125, 2: 140, 3: 150, 4: 141, 6: 120, 8: 100}.get, 100, context)
    busy = run_tuner(tuner, {0: 100, 1: 95, 2: 90, 3: 85, 4: 80, 6: 70, 8: 60}.get, 150, context)  # drafting stopped paying
    assert busy[-40:].count(0) >= 30, busy


def test_contexts_are_tuned_apart():
    tuner = DraftLengthTuner()
    run_tuner(tuner, {0: 100, 1: 80, 2: 70, 3: 60, 4: 50, 6: 40, 8: 30}.get, 100, tuner.context("upscaled", True, 16))
    assert tuner.context("upscaled", True, 16) == tuner.context("upscaled", True, 31) != tuner.context("upscaled", True, 8)
    assert tuner.choose(tuner.context("upscaled", True, 1)) == 4  # nothing measured alone yet: the start


def test_the_tuner_checks_its_choices():
    assert DraftLengthTuner(choices=(0,)).choose(("c", True, 1)) == 0  # a start outside the choices: the nearest
    with pytest.raises(InvalidArgumentError, match="choices"):
        DraftLengthTuner(choices=(4, 2))
