"""TextStream: streamed text equals the full decode of the kept tokens, cut before the
first stop string, whatever the chunking (byte-level BPE splits characters over tokens)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from services.gateway.text import REPLACEMENT, TextStream


@pytest.fixture(scope="module", params=["bpe", "word-level"])
def tokenizer(request, bpe_family, quick_family):
    family = bpe_family if request.param == "bpe" else quick_family
    return AutoTokenizer.from_pretrained(family.model_path("small-tuned"))


def decode(tokenizer, tokens) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)


def stream(tokenizer, chunks, stop=()) -> tuple[list[str], int]:
    """The texts sent per chunk (the last one at the end), and the tokens kept."""
    text, sent, kept = TextStream(tokenizer, stop), [], 0
    for chunk in chunks:
        new, n = text.add(chunk)
        sent.append(new)
        kept += n
        if text.stopped:
            break
    sent.append(text.finish())
    return sent, kept


def expected(tokenizer, tokens, stop) -> tuple[str, int]:
    """The oracle: the first prefix of tokens whose complete text holds a stop, cut there."""
    for n in range(len(tokens) + 1):
        text = decode(tokenizer, tokens[:n])
        found = [i for i in (text.rstrip(REPLACEMENT).find(s) for s in stop) if i >= 0]
        if found:
            return text[: min(found)], n
    return decode(tokenizer, tokens), len(tokens)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_multi_byte_characters_split_over_tokens_stream_exactly(bpe_family):
    tokenizer = AutoTokenizer.from_pretrained(bpe_family.model_path("small-tuned"))
    tokens = ids(tokenizer, "hello 東京 😀")
    assert any(REPLACEMENT in decode(tokenizer, tokens[:n]) for n in range(len(tokens)))  # really split
    sent, kept = stream(tokenizer, [[t] for t in tokens])
    assert "".join(sent) == "hello 東京 😀" and kept == len(tokens)  # was 'hello �hello 東�hello 東京 �hello 東京 😀'
    assert not any(REPLACEMENT in s for s in sent)


def test_a_stop_string_spread_over_chunks_is_cut_and_never_sent(bpe_family):
    tokenizer = AutoTokenizer.from_pretrained(bpe_family.model_path("small-tuned"))
    pieces = [ids(tokenizer, p) for p in ("Hello", " world", "\nUs", "er:", " more")]
    sent, kept = stream(tokenizer, pieces, ["\nUser:"])
    assert "".join(sent) == "Hello world" and kept == sum(map(len, pieces[:4]))  # was 'Hello world\nUsHello world'
    assert "\n" not in "".join(sent[:3])  # "\nUs" was held back: it could start the stop


def test_several_tokens_of_one_step_end_at_the_token_completing_the_stop(bpe_family):
    tokenizer = AutoTokenizer.from_pretrained(bpe_family.model_path("small-tuned"))
    tokens = ids(tokenizer, "the capital is 東京 . then more text")
    sent, kept = stream(tokenizer, [tokens[:2], tokens[2:]], ["京"])  # the rest arrives as one speculative step
    assert "".join(sent) == "the capital is 東" and decode(tokenizer, tokens[:kept]).endswith("東京")
    assert REPLACEMENT not in decode(tokenizer, tokens[:kept]) and REPLACEMENT in decode(tokenizer, tokens[: kept - 1])


@st.composite
def cases(draw, vocab: int, full_text):
    tokens = draw(st.lists(st.integers(0, vocab - 1), max_size=40))
    cuts = sorted(draw(st.lists(st.integers(0, len(tokens)), max_size=8)))
    chunks = [tokens[a:b] for a, b in zip([0, *cuts], [*cuts, len(tokens)])]
    text = full_text(tokens)
    spans = st.tuples(st.integers(0, max(0, len(text) - 1)), st.integers(1, 6)).map(lambda span: text[span[0] : span[0] + span[1]])
    stop = draw(st.lists(st.one_of(spans, st.text(min_size=1, max_size=3)), max_size=3))
    return tokens, chunks, [s for s in stop if s and REPLACEMENT not in s]


@settings(max_examples=400)
@given(data=st.data())
def test_streamed_text_is_the_full_decode_cut_at_the_first_stop(tokenizer, data):
    tokens, chunks, stop = data.draw(cases(len(tokenizer), lambda t: decode(tokenizer, t)))
    sent, kept = stream(tokenizer, chunks, stop)
    assert ("".join(sent), kept) == expected(tokenizer, tokens, stop)
