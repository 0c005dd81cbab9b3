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
