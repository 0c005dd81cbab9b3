"""The worker's verbs, through both transports (a real gRPC server on 127.0.0.1:0, and in process)."""

import re

import pytest
import torch
from transformers import GenerationConfig

from eft_core import InvalidArgumentError, NotFoundError, ResourceExhaustedError, SamplingParams, UnavailableError
from services.worker.api import DraftItem, ExtendItem

def sequences(vocab: int, lengths=(5, 11, 2, 8), seed=0) -> dict[str, list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return {f"s{i}": torch.randint(3, vocab, (n,), generator=generator).tolist() for i, n in enumerate(lengths)}


def full_logits(hosted_model, tokens: list[int]) -> torch.Tensor:  # [len, tokenizer_size]
    with torch.no_grad():
        return hosted_model.model(input_ids=torch.tensor([tokens])).logits[0, :, : hosted_model.tokenizer_size]


def large(hosted):
    return hosted[0]


# --- KV correctness --------------------------------------------------------------------------


def test_extend_in_pieces_equals_one_full_forward(client, hosted):
    seqs = sequences(large(hosted).tokenizer_size)
    cuts = {name: [tokens[:3], tokens[3:4], tokens[4:]] for name, tokens in seqs.items()}  # ragged pieces
    got = {name: [] for name in seqs}
    for piece in range(3):
        items = [ExtendItem(name, "large", parts[piece], num_logits=len(parts[piece])) for name, parts in cuts.items() if parts[piece]]
        for item, result in zip(items, client.extend(items)):
            got[item.session_id].append(result.logits)
            assert result.cache_length == sum(len(p) for p in cuts[item.session_id][: piece + 1])
    for name, tokens in seqs.items():
        torch.testing.assert_close(torch.cat(got[name]), full_logits(large(hosted), tokens), rtol=0, atol=1e-5)


def test_truncate_then_extend_equals_recomputation(client, hosted):
    seqs = sequences(large(hosted).tokenizer_size, lengths=(9, 6))
    client.extend([ExtendItem(name, "large", tokens) for name, tokens in seqs.items()])
    assert client.truncate("s0", "large", 4) == 4
    tail = [7, 8, 9]
    result = client.extend([ExtendItem("s0", "large", tail, num_logits=3), ExtendItem("s1", "large", [5])])
    torch.testing.assert_close(result[0].logits, full_logits(large(hosted), seqs["s0"][:4] + tail)[-3:], rtol=0, atol=1e-5)
    torch.testing.assert_close(result[1].logits, full_logits(large(hosted), seqs["s1"] + [5])[-1:], rtol=0, atol=1e-5)
    assert result[0].cache_length == 7


def test_a_rollback_riding_on_extend_and_draft_equals_truncate_first(client, hosted):
    seqs = sequences(large(hosted).tokenizer_size, lengths=(9, 6))
    client.extend([ExtendItem(name, "large", tokens) for name, tokens in seqs.items()])
    tail = [7, 8, 9]
    result = client.extend([ExtendItem("s0", "large", tail, num_logits=3, truncate_to=4), ExtendItem("s1", "large", [5])])
    torch.testing.assert_close(result[0].logits, full_logits(large(hosted), seqs["s0"][:4] + tail)[-3:], rtol=0, atol=1e-5)
    assert result[0].cache_length == 7 and result[1].cache_length == 7
    drafted = client.draft([DraftItem("s1", "large", [6], 2, SamplingParams(temperature=0), truncate_to=2)])[0]
    assert drafted.cache_length == 2 + 1 + 1  # kept 2, fed 1, and the first of the 2 drafts
    assert drafted.draft_tokens[0] == int(full_logits(large(hosted), seqs["s1"][:2] + [6])[-1].argmax())


def test_a_bad_or_lost_rollback_fails_its_item_alone_and_changes_nothing(client):
    client.extend([ExtendItem("t", "large", [1, 2, 3])])
    served, bad = client.extend([ExtendItem("u", "large", [4]), ExtendItem("t", "large", [4], truncate_to=5)])
    assert isinstance(bad, InvalidArgumentError) and re.search(r"items\[1\].truncate_to: must be in \[0, 3\]", str(bad)), bad
    assert served.cache_length == 1
    lost, served = client.extend([ExtendItem("gone", "large", [4], truncate_to=0), ExtendItem("u", "large", [5])])
    assert isinstance(lost, UnavailableError) and "items[0].truncate_to" in str(lost) and "holds no cache" in str(lost), lost
    assert served.cache_length == 2
    info = client.info()
    assert (info.sessions, info.cached_tokens) == (2, 5)  # "t" kept its 3 tokens: its refused rollback did not happen


def test_logits_drop_padding_rows_and_honour_the_wire_dtype(client, hosted):
    model = large(hosted)
    assert model.vocab_size > model.tokenizer_size  # the family pads the large vocabulary
    result = client.extend([ExtendItem("a", "large", [1, 2, 3], num_logits=2)], logits_dtype=torch.bfloat16)[0]
    assert result.logits.shape == (2, model.tokenizer_size) and result.logits.dtype == torch.bfloat16
    torch.testing.assert_close(result.logits.float(), full_logits(model, [1, 2, 3])[-2:].bfloat16().float())


def test_models_of_one_call_are_batched_separately(client, hosted):
    items = [ExtendItem("x", "large", [1, 4, 6]), ExtendItem("x", "small", [1, 4, 6, 9])]
    large_result, small_result = client.extend(items)
    torch.testing.assert_close(small_result.logits[0], full_logits(hosted[1], [1, 4, 6, 9])[-1], rtol=0, atol=1e-5)
    assert (large_result.cache_length, small_result.cache_length) == (3, 4)


# --- drafting --------------------------------------------------------------------------------


def test_greedy_draft_equals_hf_greedy_continuation(client, hosted):
    model = large(hosted)
    seqs = sequences(model.tokenizer_size, lengths=(4, 9, 6))
    ks = {"s0": 5, "s1": 2, "s2": 1}
    items = [DraftItem(name, "large", tokens, ks[name], SamplingParams(temperature=0)) for name, tokens in seqs.items()]
    for item, result in zip(items, client.draft(items)):
        with torch.no_grad():
            config = GenerationConfig(max_new_tokens=item.num_draft, do_sample=False, eos_token_id=None, pad_token_id=0)  # no early stop
            out = model.model.generate(torch.tensor([item.token_ids]), generation_config=config)
        assert result.draft_tokens == out[0, len(item.token_ids) :].tolist()
        assert result.cache_length == len(item.token_ids) + item.num_draft - 1  # the last draft is not fed yet
        one_hot = torch.nn.functional.one_hot(torch.tensor(result.draft_tokens), model.tokenizer_size).float()
        assert torch.equal(result.q.rows(list(range(item.num_draft)), model.tokenizer_size), one_hot)  # greedy q: all mass on the draft
        assert result.q.at_drafts.tolist() == [1.0] * item.num_draft and result.q.dense is None


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, seed=5), SamplingParams(temperature=0.8, top_p=0.6, seed=6), SamplingParams(temperature=1.2, top_k=7, seed=7)])
def test_a_sampled_draft_returns_the_q_it_was_drawn_from(client, hosted, params):
    """q at each drafted position is draft_distribution of the model's logits there (the
    worker's own numbers: the coordinator divides by them), sparse when filtered."""
    from eft_core import SamplingBatch
    from eft_core.sampling import draft_distribution

    model = large(hosted)
    tokens = sequences(model.tokenizer_size, lengths=(6,))["s0"]
    result = client.draft([DraftItem("q", "large", tokens, 4, params)])[0]
    expected = draft_distribution(full_logits(model, tokens + result.draft_tokens[:-1])[-4:], SamplingBatch.from_params([params] * 4))
    rows = result.q.rows(list(range(4)), model.tokenizer_size)
    torch.testing.assert_close(rows, expected, rtol=0, atol=1e-5)
    assert torch.equal(result.q.at_drafts, rows[torch.arange(4), torch.tensor(result.draft_tokens)])
    assert bool((result.q.at_drafts > 0).all())  # each draft was drawn from where q has mass
    assert (result.q.dense is None) == (params.top_p < 1 or params.top_k > 0)


def test_seeded_draft_is_reproducible_and_ignores_batch_mates(client, worker, hosted):
    tokens = sequences(large(hosted).tokenizer_size)["s1"]
    mine = SamplingParams(temperature=1.0, seed=99)

    def draft(session, others):
        items = [DraftItem(session, "large", tokens, 6, mine)] + [DraftItem(f"{session}-{j}", "large", [3, 4], k, SamplingParams()) for j, k in enumerate(others)]
        return client.draft(items)[0].draft_tokens

    alone, crowded, again = draft("a", []), draft("b", [3, 7, 1]), draft("c", [8])
    assert alone == crowded == again
    different = client.draft([DraftItem("d", "large", tokens, 6, SamplingParams(temperature=1.0, seed=100))])[0].draft_tokens
    assert different != alone


def test_draft_continues_its_own_generator_across_calls(client, hosted):
    params = SamplingParams(temperature=1.0, seed=5)
    first = client.draft([DraftItem("g", "large", [1, 2, 3], 3, params)])[0]
    second = client.draft([DraftItem("g", "large", [first.draft_tokens[-1]], 3, params)])[0]
    replay_first = client.draft([DraftItem("h", "large", [1, 2, 3], 3, params)])[0]
    replay_second = client.draft([DraftItem("h", "large", [replay_first.draft_tokens[-1]], 3, params)])[0]
    assert (first.draft_tokens, second.draft_tokens) == (replay_first.draft_tokens, replay_second.draft_tokens)


# --- budget and release ----------------------------------------------------------------------


def test_release_frees_every_cache_of_a_session(client):
    client.extend([ExtendItem("r", "large", [1, 2, 3]), ExtendItem("r", "small", [1, 2]), ExtendItem("keep", "large", [4])])
    assert (client.info().sessions, client.info().cached_tokens) == (3, 6)
    assert client.release(["r", "unknown"]) == 2
    assert (client.info().sessions, client.info().cached_tokens) == (1, 1)
    assert client.release(["keep"]) == 1
    assert (client.info().sessions, client.info().cached_tokens) == (0, 0)


def test_sessions_unused_for_the_idle_timeout_are_released_and_used_ones_kept(worker):
    import time

    worker.extend([ExtendItem("abandoned", "large", [1, 2, 3]), ExtendItem("abandoned", "small", [1]), ExtendItem("running", "large", [4])])
    time.sleep(0.3)
    worker.extend([ExtendItem("running", "large", [5])])  # a running request uses its caches every step
    assert worker.release_idle(0.2) == ["abandoned"]
    assert (worker.info().sessions, worker.info().cached_tokens) == (1, 2)
    assert worker.release_idle(0.2) == []
    time.sleep(0.3)
    worker.truncate("running", "large", 1)  # any call on a session counts as use
    assert worker.release_idle(0.2) == [] and worker.info().sessions == 1


def test_the_idle_reaper_frees_an_abandoned_session_in_the_background(worker):
    import time

    from services.worker.worker import start_idle_reaper

    stop = start_idle_reaper(worker, 0.4)
    try:
        worker.extend([ExtendItem("abandoned", "large", [1, 2, 3])])
        deadline = time.monotonic() + 5
        while worker.info().sessions and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker.info().sessions == 0
    finally:
        stop.set()


def test_over_budget_fails_only_the_items_beyond_it(client, hosted):
    tokens = [3 + i % 50 for i in range(60)]
    client.extend([ExtendItem("a", "large", tokens[:40])])  # budget: 400 tokens, 16 sessions
    answers = client.extend([ExtendItem(f"b{i}", "large", tokens[:57]) for i in range(7)] + [ExtendItem("a", "large", [5])])
    assert [isinstance(a, ResourceExhaustedError) for a in answers] == [False] * 6 + [True, False]  # 40 + 6 x 57 + 1 fit, a seventh 57 does not
    assert "items[6]" in str(answers[6]) and "budget 400" in str(answers[6])
    info = client.info()
    assert (info.sessions, info.cached_tokens) == (7, 40 + 6 * 57 + 1)
    torch.testing.assert_close(answers[7].logits, full_logits(large(hosted), tokens[:40] + [5])[-1:], rtol=0, atol=1e-5)
    torch.testing.assert_close(answers[5].logits, full_logits(large(hosted), tokens[:57])[-1:], rtol=0, atol=1e-5)
    client.release([f"b{i}" for i in range(6)])
    answers = client.extend([ExtendItem(f"c{i}", "small", [3]) for i in range(16)])  # "a" holds one of the 16
    assert [i for i, a in enumerate(answers) if isinstance(a, ResourceExhaustedError)] == [15] and "sessions held" in str(answers[15])


def test_longer_than_the_model_is_resource_exhausted(client, hosted):
    limit = large(hosted).max_sequence_length
    answer = client.extend([ExtendItem("long", "large", [3] * (limit + 1))])[0]
    assert isinstance(answer, ResourceExhaustedError) and f"over the model's {limit}" in str(answer)


# --- bad requests ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "item, error, field",
    [
        (ExtendItem("s", "nope", [1]), NotFoundError, "items[1].model"),
        (ExtendItem("s", "large", []), InvalidArgumentError, "items[1].token_ids"),
        (ExtendItem("s", "large", [1, 10_000]), InvalidArgumentError, "items[1].token_ids"),
        (ExtendItem("s", "large", [1, -1]), InvalidArgumentError, "items[1].token_ids"),
        (ExtendItem("s", "large", [1, 2], num_logits=3), InvalidArgumentError, "items[1].num_logits"),
        (ExtendItem("fine", "large", [2]), InvalidArgumentError, "items[1]: session 'fine' appears twice"),
        (ExtendItem("", "large", [1]), InvalidArgumentError, "items[1].session_id"),
    ],
)
def test_a_bad_item_gets_its_status_and_its_batch_mate_is_served(client, item, error, field):
    served, refused = client.extend([ExtendItem("fine", "large", [1, 2]), item])
    assert isinstance(refused, error) and field in str(refused), refused
    assert served.cache_length == 2
    assert client.info().sessions == 1


def test_a_call_without_items_is_refused_whole(client):
    with pytest.raises(InvalidArgumentError, match="items: must hold at least one item"):
        client.extend([])


def test_bad_truncate_and_draft_requests(client):
    with pytest.raises(NotFoundError, match="no session 'ghost'"):
        client.truncate("ghost", "large", 0)
    client.extend([ExtendItem("t", "large", [1, 2, 3])])
    with pytest.raises(InvalidArgumentError, match=r"length: must be in \[0, 3\]"):
        client.truncate("t", "large", 4)
    refused = client.draft([DraftItem("t", "large", [4], 0)])[0]
    assert isinstance(refused, InvalidArgumentError) and "items[0].num_draft" in str(refused)
    assert client.info().cached_tokens == 3


def test_logits_travel_in_the_models_own_dtype_unless_asked_otherwise(quick_family):
    """A bfloat16 model's logits come back in bfloat16 by default (its LM head's output: half
    of float32's bytes), and asking for float32 gives exactly those values, upcast."""
    from services.worker.client import GrpcWorkerClient
    from services.worker.server import create_server
    from services.worker.worker import ModelWorker, load_hosted_model

    hosted = load_hosted_model("large", quick_family.model_path("large-base"), torch.bfloat16)
    server, port = create_server(ModelWorker([hosted]), "127.0.0.1:0")
    try:
        client = GrpcWorkerClient(f"127.0.0.1:{port}")
        native = client.extend([ExtendItem("a", "large", [1, 2, 3], num_logits=2)])[0].logits
        upcast = client.extend([ExtendItem("b", "large", [1, 2, 3], num_logits=2)], logits_dtype=torch.float32)[0].logits
        assert native.dtype == torch.bfloat16 and native.shape == (2, hosted.tokenizer_size) and upcast.dtype == torch.float32
        assert torch.equal(upcast, native.float())
        torch.testing.assert_close(native.float(), full_logits(hosted, [1, 2, 3])[-2:].float(), rtol=0, atol=0.1)
        client.close()
    finally:
        server.stop(grace=None)
