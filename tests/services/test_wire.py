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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensors_decoded_as_views_of_the_response_equal_the_parsed_ones(dtype):
    """Responses with served and failed items, Extend and Draft: the views tensor_payloads
    finds in the serialized bytes decode to the tensors protobuf's parsing gives."""
    from eft_core import UnavailableError
    from services.worker import convert
    from services.worker.api import Drafted, Extended

    logits = [torch.randn(n, 300) for n in (1, 5, 3)]
    extend = convert.extend_response([Extended(logits[0], 4), UnavailableError("lost"), Extended(logits[2], 9)], dtype).SerializeToString()
    draft = convert.draft_response([Drafted([1, 2, 3, 4, 5], logits[1], 7), UnavailableError("lost"), Drafted([7], logits[0], 2)], dtype).SerializeToString()
    for raw, response_class, decode, path in [
        (extend, worker_pb2.ExtendResponse, convert.extended_from_proto, convert.EXTEND_TENSORS),
        (draft, worker_pb2.DraftResponse, convert.drafted_from_proto, convert.DRAFT_TENSORS),
    ]:
        viewed, _ = convert.raw_decoder(response_class, decode, path)(raw)
        parsed = decode(response_class.FromString(raw))
        assert [type(a) for a in viewed] == [type(a) for a in parsed] and isinstance(viewed[1], UnavailableError)
        for a, b in zip(viewed, parsed):
            if not isinstance(a, UnavailableError):
                assert a.logits.dtype == dtype and torch.equal(a.logits, b.logits) and a.cache_length == b.cache_length
