"""The load test's stream check catches every way a stream can go wrong (no server needed)."""

import pytest

from cluster.loadtest import Case, _stream_problem
from services.pb.eft.v1 import eft_pb2

EXPECTED = (5, 6, 7, 8)
CASE = Case("c", eft_pb2.GenerateRequest(), EXPECTED, eft_pb2.FINISH_REASON_STOP)


def chunks(*token_lists, finish=eft_pb2.FINISH_REASON_STOP, count=None, finish_on=None):
    out = [eft_pb2.GenerateStreamResponse(token_ids=t) for t in token_lists]
    where = out[-1] if finish_on is None else out[finish_on]
    where.finish_reason = finish
    where.usage.completion_tokens = sum(map(len, token_lists)) if count is None else count
    return out


def problem(stream):
    return _stream_problem(CASE, [t for c in stream for t in c.token_ids], stream)


def test_a_correct_stream_passes():
    assert problem(chunks([5, 6], [7], [8])) is None


@pytest.mark.parametrize("stream, says", [
    (chunks([5, 6], [7]), "truncated: 3 of 4"),
    (chunks([5, 6], [6, 7], [8]), "differs at token 2"),  # a chunk repeated a token
    (chunks([5, 7], [8]), "differs at token 1"),  # a token lost
    (chunks([5, 6], [7, 8], [8]), "1 tokens past the end"),
    (chunks([5, 6], [7, 8], finish=eft_pb2.FINISH_REASON_LENGTH), "final chunk says FINISH_REASON_LENGTH"),
    (chunks([5, 6], [7, 8], count=3), "after 3 tokens"),
    (chunks([5, 6], [7, 8], finish_on=0), "(one, the last, should)"),
])
def test_lost_repeated_truncated_or_mislabelled_streams_are_caught(stream, says):
    assert says in problem(stream)
