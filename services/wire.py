"""Tensors on the wire: raw little-endian bytes with dtype and shape beside them (never pickle).

The one place that converts between torch tensors and ``eft.v1.Tensor`` messages.
"""

import sys
import warnings

import numpy as np
import torch

from eft_core.errors import InvalidArgumentError, require
from services.pb.eft.v1 import worker_pb2

_TO_WIRE = {
    torch.float32: (worker_pb2.DTYPE_FLOAT32, "<f4"),
    torch.bfloat16: (worker_pb2.DTYPE_BFLOAT16, "<u2"),  # raw 16-bit patterns
    torch.float16: (worker_pb2.DTYPE_FLOAT16, "<f2"),
}
_FROM_WIRE = {wire: (dtype, numpy) for dtype, (wire, numpy) in _TO_WIRE.items()}
_FROM_WIRE[worker_pb2.DTYPE_UNSPECIFIED] = _FROM_WIRE[worker_pb2.DTYPE_FLOAT32]
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def wire_dtype(dtype_enum: int) -> torch.dtype:
    """The torch dtype a request's ``logits_dtype`` asks for (unspecified: float32)."""
    if dtype_enum not in _FROM_WIRE:
        raise InvalidArgumentError(f"unknown dtype {dtype_enum}", field="logits_dtype")
    return _FROM_WIRE[dtype_enum][0]


def to_wire(tensor: torch.Tensor, dtype: torch.dtype = torch.float32) -> worker_pb2.Tensor:
    """Encode ``tensor`` (cast to ``dtype``) as raw little-endian bytes."""
    wire, numpy_dtype = _TO_WIRE[dtype]
    cast = tensor.detach().to("cpu", dtype).contiguous()
    if dtype == torch.bfloat16:
        cast = cast.view(torch.int16)
    array = cast.numpy().astype(numpy_dtype, copy=False)
    return worker_pb2.Tensor(dtype=wire, shape=list(tensor.shape), data=array.tobytes())


def from_wire(message: worker_pb2.Tensor, field: str = "tensor") -> torch.Tensor:
    """Decode a Tensor message; a size that disagrees with the shape is refused. The tensor
    is a read-only view of the message's bytes: no copy beyond the one reading the field
    makes (every access of a bytes field copies, so it is read once)."""
    require(message.dtype in _FROM_WIRE, f"{field}.dtype", f"unknown dtype {message.dtype}")
    dtype, numpy_dtype = _FROM_WIRE[message.dtype]
    shape, data = tuple(message.shape), message.data
    require(all(d >= 0 for d in shape), f"{field}.shape", f"negative dimension in {shape}")
    itemsize = np.dtype(numpy_dtype).itemsize
    require(len(data) == int(np.prod(shape, dtype=np.int64)) * itemsize, f"{field}.data", f"{len(data)} bytes do not fit shape {shape} of {dtype}")
    if sys.byteorder != "little":  # swap into a copy
        array = np.frombuffer(data, dtype=numpy_dtype).reshape(shape).astype(np.dtype(numpy_dtype).newbyteorder("="))
        return torch.from_numpy(array.astype(np.int16)).view(torch.bfloat16) if dtype == torch.bfloat16 else torch.from_numpy(array)
    if not data:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "not writable": the tensor is read-only, never written in place
        return torch.frombuffer(data, dtype=dtype).reshape(shape)
