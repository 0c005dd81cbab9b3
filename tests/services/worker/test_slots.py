"""The slot cache on its own: random calls (new sessions, subsets of the held ones, ragged
and empty rows, rollbacks, releases) on a GQA model and on a sliding-window one, each
answer equal to a full forward of that session's tokens; and a steady decode step that
moves and allocates nothing."""

import random

import pytest
import torch
import transformers

from services.worker.slots import SessionSlots

VOCAB = 50


def _model(kind: str) -> torch.nn.Module:
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512)
    config = transformers.LlamaConfig(**common) if kind == "llama" else transformers.MistralConfig(sliding_window=5, **common)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("kind", ["llama", "mistral"])
@pytest.mark.parametrize("max_forward_tokens", [8, 8192])
def test_random_calls_equal_full_forwards(kind, max_forward_tokens):
    model, rng, held = _model(kind), random.Random(kind), {}
    slots = SessionSlots(model, max_forward_tokens)
    for step in range(120):
        roll = rng.random()
        if roll < 0.12 and held:
            gone = rng.sample(sorted(held), rng.randint(1, len(held)))
            slots.release(gone)
            for session in gone:
                del held[session]
            continue
        if roll < 0.25 and held:
            session = rng.choice(sorted(held))
            held[session] = held[session][: rng.randint(0, len(held[session]))]
            slots.truncate(session, len(held[session]))
            continue
        pool = sorted(held) + [f"new{step}.{j}" for j in range(rng.randint(0 if held else 1, 2))]
        ids = rng.sample(pool, rng.randint(1, len(pool)))
        tokens = [[rng.randrange(VOCAB) for _ in range(rng.choice([0, 1, 1, 3, 9]) or (0 if s in held else 1))] for s in ids]
        keep = [min(2, len(t)) for t in tokens]
        if not any(tokens):
            continue
        out = slots.step(ids, tokens, keep, 10**7)
        for i, (session, new) in enumerate(zip(ids, tokens)):
            held[session] = held.get(session, []) + new
            assert slots.length(session) == len(held[session])
            if new:
                with torch.no_grad():
                    expected = model(input_ids=torch.tensor([held[session]])).logits[0, -keep[i] :]
                torch.testing.assert_close(out[i, out.shape[1] - keep[i] :], expected, rtol=0, atol=1e-4)


def test_a_steady_decode_step_moves_and_allocates_nothing(monkeypatch):
    slots = SessionSlots(_model("llama"), 8192)
    ids = [f"s{i}" for i in range(4)]
    slots.step(ids, [[1, 2, 3]] * 4, [1] * 4, 10**7)
    slots.step(ids, [[4]] * 4, [1] * 4, 10**7)  # grows the columns once, geometrically
    buffers = [b.data_ptr() for b in slots.keys + slots.values]
    monkeypatch.setattr(slots, "_swap", lambda *a: pytest.fail("a steady step moved a row"))
    for token in (5, 6):
        slots.step(list(reversed(ids)), [[token]] * 4, [1] * 4, 10**7)  # another order: rows stay, inputs follow them
    assert [b.data_ptr() for b in slots.keys + slots.values] == buffers
    assert slots.shape() == (4, 6)


def test_growth_stays_within_the_limit():
    slots = SessionSlots(_model("llama"), 8192)
    slots.step(["a", "b"], [[1] * 10, [2]], [1, 1], 10**7)
    assert slots.allocated == 2 * 20  # the longest row and one forward's padding
    slots.step(["a", "b"], [[3] * 15, [4]], [1, 1], 60)  # the target (2 x 40) would pass 60 slots: this forward's need
    assert slots.allocated == 2 * 25 and slots.shape() == (2, 25)


def test_a_failed_step_leaves_every_session_as_it_was(monkeypatch):
    model = _model("llama")
    slots = SessionSlots(model, 8)  # 2 rows x 4 positions per forward: the 9-token row takes 3
    slots.step(["a"], [[1, 2, 3]], [1], 10**7)
    forward, calls = slots._forward, []

    def fails_second(tokens, heads):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the device fell over")
        return forward(tokens, heads)

    monkeypatch.setattr(slots, "_forward", fails_second)
    with pytest.raises(RuntimeError, match="fell over"):
        slots.step(["b", "a"], [[4] * 9, [5]], [1, 1], 10**7)
    assert (slots.length("a"), slots.length("b"), slots.shape()) == (3, 0, (1, 3))
    monkeypatch.setattr(slots, "_forward", forward)
    out = slots.step(["a"], [[5]], [1], 10**7)
    with torch.no_grad():
        torch.testing.assert_close(out[0], model(input_ids=torch.tensor([[1, 2, 3, 5]])).logits[0, -1:], rtol=0, atol=1e-4)
