from eft_core import SpeculationStats


def test_observe_draft_counts_drafts_tokens_and_positions():
    stats = SpeculationStats()
    stats.observe_draft(4, 2)  # positions 0 and 1 accepted
    stats.observe_draft(2, 2)
    stats.observe_draft(3, 0)
    stats.observe_draft(0, 0)  # no draft: nothing to count
    assert (stats.drafts, stats.draft_tokens, stats.accepted_tokens) == (3, 9, 4)
    assert stats.accepted_per_position == [2, 2, 0, 0]
    assert stats.acceptance_rate == 4 / 9
    assert stats.mean_accepted_length == 4 / 3


def test_merge_adds_counters_and_positions():
    a, b = SpeculationStats(), SpeculationStats()
    a.observe_draft(2, 1)
    b.observe_draft(5, 4)
    a.merge(b)
    assert (a.drafts, a.draft_tokens, a.accepted_tokens) == (2, 7, 5)
    assert a.accepted_per_position == [2, 1, 1, 1, 0]


def test_empty_stats_have_zero_rates():
    assert SpeculationStats().acceptance_rate == 0.0
    assert SpeculationStats().mean_accepted_length == 0.0
