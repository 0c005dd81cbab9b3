import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eft_core import InvalidArgumentError, accept_drafts, accept_drafts_greedy
from eft_core.speculative import DraftProbs, accept_greedy_ragged, accept_ragged
from tests.eft_core.helpers import perturbed, random_probs, seeded, tv_distance


def one_hot(*tokens: int, vocab: int = 3) -> torch.Tensor:  # [len(tokens), vocab]
    return torch.nn.functional.one_hot(torch.tensor(tokens), vocab).float()


# --- literal cases ---------------------------------------------------------------------------


def test_accepts_up_to_the_first_rejection_then_emits_the_recovered_token():
    drafts = torch.tensor([[0, 1]])
    q = one_hot(0, 1)[None]
    p = torch.stack([one_hot(0)[0], one_hot(2)[0], one_hot(1)[0]])[None]  # mismatch at position 1
    result = accept_drafts(drafts, torch.tensor([2]), q, p, {})
    assert result.num_accepted.tolist() == [1]
    assert result.output_tokens.tolist() == [[0, 2, -1]]  # recovered from max(0, p - q) = token 2
    assert result.emitted(0) == [0, 2]


def test_all_accepted_emits_the_bonus_token():
    drafts = torch.tensor([[0, 1]])
    q = one_hot(0, 1)[None]
    p = one_hot(0, 1, 2)[None]
    result = accept_drafts(drafts, torch.tensor([2]), q, p, {})
    assert result.output_tokens.tolist() == [[0, 1, 2]]  # bonus from p_{k+1}
    assert result.num_emitted.tolist() == [3]


def test_rows_with_different_draft_lengths():
    drafts = torch.tensor([[0, 1, 2], [2, 0, 0], [1, 1, 1]])  # row 1 drafts 1 token, row 2 none
    num_draft = torch.tensor([3, 1, 0])
    q = one_hot(0, 1, 2).expand(3, 3, 3).clone()
    q[1, 0] = one_hot(2)[0]
    p = one_hot(0, 1, 2, 0).expand(3, 4, 3).clone()
    p[1, 0], p[1, 1] = one_hot(2)[0], one_hot(1)[0]  # row 1: accept its one draft, bonus = p at index 1
    p[2, 0] = one_hot(1)[0]  # row 2: bonus straight from p at index 0
    result = accept_drafts(drafts, num_draft, q, p, {})
    assert result.num_accepted.tolist() == [3, 1, 0]
    assert result.output_tokens.tolist() == [[0, 1, 2, 0], [2, 1, -1, -1], [1, -1, -1, -1]]


def test_recovered_token_follows_the_residual_distribution_literal():
    # p = [0.5, 0.5, 0], q = [1, 0, 0], draft 0: accepted with probability 0.5,
    # recovered from max(0, p - q) = [0, 0.5, 0] -> always token 1
    p = torch.tensor([[[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]]).expand(4000, 2, 3)
    q = torch.tensor([[[1.0, 0.0, 0.0]]]).expand(4000, 1, 3)
    torch.manual_seed(0)
    result = accept_drafts(torch.zeros(4000, 1, dtype=torch.long), torch.ones(4000, dtype=torch.long), q, p, {})
    accepted = result.num_accepted == 1
    assert abs(accepted.float().mean().item() - 0.5) < 0.03
    assert result.output_tokens[~accepted, 0].eq(1).all()
    assert result.output_tokens[accepted].tolist()[0] == [0, 2]


# --- greedy form -----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("batch", [1, 4, 16])
def test_greedy_form_equals_the_general_rule_on_one_hot_distributions(k, batch):
    vocab = 4  # small, so drafts often match
    gen = seeded(k * 100 + batch)
    drafts = torch.randint(0, vocab, (batch, k), generator=gen)
    target_argmax = torch.randint(0, vocab, (batch, k + 1), generator=gen)
    target_argmax[:, :k] = torch.where(torch.rand(batch, k, generator=gen) < 0.7, drafts, target_argmax[:, :k])
    num_draft = torch.randint(0, k + 1, (batch,), generator=gen)
    num_draft[0], target_argmax[0, :k] = k, drafts[0]  # row 0 accepts everything: a bonus token
    greedy = accept_drafts_greedy(drafts, num_draft, target_argmax)
    general = accept_drafts(
        drafts,
        num_draft,
        torch.nn.functional.one_hot(drafts, vocab).float(),
        torch.nn.functional.one_hot(target_argmax, vocab).float(),
        {},
    )
    assert torch.equal(greedy.num_accepted, general.num_accepted)
    assert torch.equal(greedy.output_tokens, general.output_tokens)
    assert int(greedy.num_accepted[0]) == k


# --- statistical: emitted tokens are distributed exactly as p --------------------------------


def emitted_counts(result, batch: int, k: int, vocab: int) -> torch.Tensor:  # [batch, k + 1, vocab]
    rows = result.output_tokens.shape[0]
    positions = torch.arange(k + 1).expand(rows, -1)
    valid = positions < result.num_emitted[:, None]
    session = (torch.arange(rows) % batch)[:, None].expand(-1, k + 1)
    flat = (session * (k + 1) + positions) * vocab + result.output_tokens.clamp_min(0)
    return torch.bincount(flat[valid], minlength=batch * (k + 1) * vocab).reshape(batch, k + 1, vocab).float()


def weighted_tv(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """TV per (session, position), averaged with the number of tokens emitted there as weight."""
    n = counts.sum(dim=-1)
    return float((tv_distance(counts, probs) * n).sum() / n.sum())


@pytest.mark.parametrize("drafter", ["far", "near"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_speculative_samples_converge_to_the_target(k, batch, drafter):
    vocab, trials = 8, 20_000
    p = random_probs(batch, k + 1, vocab, seed=k * 10 + batch)
    q = random_probs(batch, k, vocab, seed=99) if drafter == "far" else perturbed(p[:, :k], seed=98, size=0.5)
    wrong = perturbed(p, seed=97, size=0.3)
    num_draft = torch.randint(0, k + 1, (batch,), generator=seeded(5))
    num_draft[0] = k
    torch.manual_seed(1234)
    q_rows, p_rows = q.repeat(trials, 1, 1), p.repeat(trials, 1, 1)
    drafts = torch.multinomial(q_rows.reshape(-1, vocab), 1).reshape(-1, k)  # d_j ~ q_j
    result = accept_drafts(drafts, num_draft.repeat(trials), q_rows, p_rows, {})

    assert ((0 <= result.num_accepted) & (result.num_accepted <= num_draft.repeat(trials))).all()
    full, tenth = emitted_counts(result, batch, k, vocab), emitted_counts(_first(result, trials // 10 * batch), batch, k, vocab)
    assert all(full[b, int(num_draft[b]) + 1 :].sum() == 0 for b in range(batch))  # nothing past the bonus
    near_full, near_tenth, wrong_full = weighted_tv(full, p), weighted_tv(tenth, p), weighted_tv(full, wrong)
    assert near_full < near_tenth / 2, (near_full, near_tenth)
    assert near_full < wrong_full / 3, (near_full, wrong_full)
    # acceptance at the first position is sum(min(p, q)), as the rule implies
    first = result.num_accepted.reshape(trials, batch)[:, 0] >= 1
    expected = torch.minimum(p[0, 0], q[0, 0]).sum()
    assert abs(first.float().mean() - expected) < 0.02


def _first(result, rows: int):
    return type(result)(result.num_accepted[:rows], result.output_tokens[:rows])


# --- seeds -----------------------------------------------------------------------------------


def test_seeded_rows_do_not_depend_on_batch_mates():
    k, vocab = 3, 10
    p, q = random_probs(4, k + 1, vocab, seed=1), random_probs(4, k, vocab, seed=2)
    drafts = torch.multinomial(q.reshape(-1, vocab), 1, generator=seeded(3)).reshape(4, k)
    num_draft = torch.full((4,), k)
    alone = accept_drafts(drafts[2:3], num_draft[2:3], q[2:3], p[2:3], {0: seeded(77)})
    in_batch = accept_drafts(drafts, num_draft, q, p, {2: seeded(77), 0: seeded(5)})
    assert alone.output_tokens[0].tolist() == in_batch.output_tokens[2].tolist()
    runs = {tuple(accept_drafts(drafts, num_draft, q, p, {1: seeded(s)}).output_tokens[1].tolist()) for s in range(30)}
    assert len(runs) > 1  # the seed really drives the row


# --- properties and bad input ----------------------------------------------------------------


@given(
    batch=st.integers(1, 6),
    k=st.integers(0, 6),
    vocab=st.integers(2, 12),
    seed=st.integers(0, 2**31),
)
def test_acceptance_counts_stay_within_each_rows_draft(batch, k, vocab, seed):
    gen = seeded(seed)
    p = random_probs(batch, k + 1, vocab, seed=seed)
    q = random_probs(batch, k, vocab, seed=seed + 1)
    drafts = torch.randint(0, vocab, (batch, k), generator=gen)
    num_draft = torch.randint(0, k + 1, (batch,), generator=gen)
    result = accept_drafts(drafts, num_draft, q, p, {0: seeded(seed)})
    assert ((0 <= result.num_accepted) & (result.num_accepted <= num_draft)).all()
    for row in range(batch):
        emitted = result.emitted(row)
        n = int(result.num_accepted[row])
        assert emitted[:n] == drafts[row, :n].tolist() and 0 <= emitted[n] < vocab
        assert result.output_tokens[row, n + 1 :].eq(-1).all()


@pytest.mark.parametrize(
    "num_draft, draft_shape, target_k, field",
    [
        ([-1], (1, 2), 3, "num_draft"),
        ([3], (1, 2), 3, "num_draft"),
        ([2], (1, 2), 4, "target_probs"),
        ([2, 2], (1, 2), 3, "num_draft"),
    ],
)
def test_bad_shapes_and_counts_name_the_field(num_draft, draft_shape, target_k, field):
    drafts = torch.zeros(draft_shape, dtype=torch.long)
    q = random_probs(1, 2, 5, seed=0)
    p = random_probs(1, target_k, 5, seed=1)
    with pytest.raises(InvalidArgumentError) as error:
        accept_drafts(drafts, torch.tensor(num_draft), q, p, {})
    assert error.value.field == field


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 4), min_size=1, max_size=6), seed=st.integers(0, 2**31), vocab=st.integers(2, 40))
def test_ragged_acceptance_gives_each_seeded_row_what_it_gets_alone(lengths, seed, vocab):
    """One batched acceptance over rows of different draft lengths (0: plain sampling) gives
    each row the tokens it gets alone with the same generator."""
    generator = seeded(seed)
    q = [random_probs(k, vocab, seed=seed + 2 * b) for b, k in enumerate(lengths)]
    p = [perturbed(random_probs(k + 1, vocab, seed=seed + 2 * b + 1), seed) for b, k in enumerate(lengths)]
    drafts = [torch.multinomial(rows, 1, generator=generator)[:, 0].tolist() if len(rows) else [] for rows in q]
    gens = lambda: {b: torch.Generator().manual_seed(seed + b) for b in range(len(lengths))}  # noqa: E731
    ragged = accept_ragged(drafts, torch.cat(p), DraftProbs.dense(torch.cat(q) if sum(lengths) else torch.zeros(0, vocab), sum(drafts, [])), gens())
    for b, (k, alone_gen) in enumerate(zip(lengths, gens().values())):
        alone = accept_drafts(torch.tensor([drafts[b]], dtype=torch.int64).reshape(1, k), torch.tensor([k]), q[b].reshape(1, k, vocab), p[b][None], {0: alone_gen})
        assert ragged[b] == alone.emitted(0)
    greedy = accept_greedy_ragged(drafts, torch.cat(p).argmax(dim=-1))
    for b, k in enumerate(lengths):
        alone = accept_drafts_greedy(torch.tensor([drafts[b]], dtype=torch.int64).reshape(1, k), torch.tensor([k]), p[b].argmax(dim=-1)[None])
        assert greedy[b] == alone.emitted(0)
