import numpy as np
import pytest
import torch

from eft_core import InvalidArgumentError
from services.pb.eft.v1 import worker_pb2
from services.wire import from_wire, to_wire


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 7), (2, 0, 4), (5,)])
def test_round_trip_is_exact_in_the_wire_dtype(dtype, shape):
    tensor = torch.randn(shape)
    back = from_wire(to_wire(tensor, dtype))
    assert back.dtype == dtype and back.shape == tensor.shape
    assert torch.equal(back, tensor.to(dtype))


def test_bytes_are_little_endian_float32():
    message = to_wire(torch.tensor([1.0, -2.5]))
    assert message.data == np.array([1.0, -2.5], dtype="<f4").tobytes()
    assert (message.dtype, list(message.shape)) == (worker_pb2.DTYPE_FLOAT32, [2])


@pytest.mark.parametrize(
    "message, field",
    [
        (worker_pb2.Tensor(dtype=worker_pb2.DTYPE_FLOAT32, shape=[2, 3], data=b"\x00" * 20), "logits.data"),
        (worker_pb2.Tensor(dtype=worker_pb2.DTYPE_FLOAT32, shape=[-1], data=b""), "logits.shape"),
        (worker_pb2.Tensor(dtype=9, shape=[1], data=b"\x00" * 4), "logits.dtype"),
    ],
)
def test_malformed_tensors_are_refused(message, field):
    with pytest.raises(InvalidArgumentError) as error:
        from_wire(message, "logits")
    assert error.value.field == field


def _draft_qs():
    """A dense q (unfiltered sampling), a sparse one (top-p), a one-hot one (greedy)."""
    from eft_core import SamplingBatch, SamplingParams
    from eft_core.sampling import draft_distribution
    from services.worker.api import DraftQ

    logits = 3 * torch.randn(5, 300, generator=torch.Generator().manual_seed(0))
    full = draft_distribution(logits, SamplingBatch.from_params([SamplingParams()] * 5))
    nucleus = draft_distribution(logits[:3], SamplingBatch.from_params([SamplingParams(top_p=0.5)] * 3))
    drafts = torch.tensor([4, 8, 15, 16, 23])
    nucleus_drafts = nucleus.argmax(dim=-1)
    return [(DraftQ.of(full, drafts), full, drafts), (DraftQ.of(nucleus, nucleus_drafts), nucleus, nucleus_drafts), (DraftQ.one_hot(drafts[:2]), torch.nn.functional.one_hot(drafts[:2], 300).float(), drafts[:2])]


def test_a_drafters_q_travels_sparse_where_that_is_smaller_and_its_rows_are_exact():
    (dense, full, drafts), (sparse, nucleus, nucleus_drafts), (one_hot, expected, greedy_drafts) = _draft_qs()
    assert dense.dense is not None and sparse.dense is None and one_hot.dense is None
    assert sparse.nbytes < nucleus.nbytes / 4 and one_hot.nbytes == 2 * 4 + 2 * 4 + 2 * 4
    for q, rows, tokens in [(dense, full, drafts), (sparse, nucleus, nucleus_drafts), (one_hot, expected, greedy_drafts)]:
        assert torch.equal(q.rows(list(range(len(rows))), 300), rows)
        assert torch.equal(q.at_drafts, rows[torch.arange(len(tokens)), tokens])
        assert torch.equal(q.rows([len(rows) - 1, 0], 300), rows[[len(rows) - 1, 0]])


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16])
def test_tensors_decoded_as_views_of_the_response_equal_the_parsed_ones(dtype):
    """Responses with served and failed items, Extend (in the model's own dtype, or asked
    for one) and Draft (q dense, sparse and one-hot): the views tensor_payloads finds in the
    serialized bytes decode to what protobuf's parsing gives, and to what was sent."""
    from eft_core import UnavailableError
    from services.worker import convert
    from services.worker.api import Drafted, Extended

    logits = [torch.randn(n, 300).bfloat16() for n in (1, 5, 3)]
    extend = convert.extend_response([Extended(logits[0], 4), UnavailableError("lost"), Extended(logits[2], 9)], dtype).SerializeToString()
    viewed, _ = convert.raw_decoder(worker_pb2.ExtendResponse, convert.extended_from_proto, convert.EXTEND_TENSORS)(extend)
    parsed = convert.extended_from_proto(worker_pb2.ExtendResponse.FromString(extend))
    assert isinstance(viewed[1], UnavailableError) and isinstance(parsed[1], UnavailableError)
    for a, b, sent in [(viewed[0], parsed[0], logits[0]), (viewed[2], parsed[2], logits[2])]:
        assert a.logits.dtype == (dtype or torch.bfloat16) and torch.equal(a.logits, b.logits) and torch.equal(a.logits.float(), sent.float())

    qs = _draft_qs()
    draft = convert.draft_response([Drafted(qs[0][2].tolist(), qs[0][0], 7), UnavailableError("lost"), *(Drafted(t.tolist(), q, 2) for q, _, t in qs[1:])]).SerializeToString()
    viewed, _ = convert.raw_decoder(worker_pb2.DraftResponse, convert.drafted_from_proto, convert.DRAFT_TENSORS)(draft)
    parsed = convert.drafted_from_proto(worker_pb2.DraftResponse.FromString(draft))
    assert isinstance(viewed[1], UnavailableError) and isinstance(parsed[1], UnavailableError)
    for a, b, (_, rows, tokens) in zip([viewed[0], *viewed[2:]], [parsed[0], *parsed[2:]], qs):
        assert a.draft_tokens == b.draft_tokens == tokens.tolist()
        assert torch.equal(a.q.at_drafts, b.q.at_drafts) and torch.equal(a.q.rows(list(range(len(rows))), 300), rows)
        assert torch.equal(b.q.rows(list(range(len(rows))), 300), rows)


def test_a_malformed_sparse_q_is_refused_naming_it():
    from services.worker import convert

    message = worker_pb2.DraftResponse(results=[worker_pb2.DraftResult(draft_tokens=[1], q=worker_pb2.DraftProbs(at_drafts=[0.5], row_sizes=[3], indices=to_wire(torch.tensor([1, 2], dtype=torch.int32)), values=to_wire(torch.tensor([0.5, 0.5]))))])
    with pytest.raises(InvalidArgumentError) as error:
        convert.drafted_from_proto(message)
    assert error.value.field == "results[0].q"
