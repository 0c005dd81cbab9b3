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
    torch.int32: (worker_pb2.DTYPE_INT32, "<i4"),
}
_FROM_WIRE = {wire: (dtype, numpy) for dtype, (wire, numpy) in _TO_WIRE.items()}
_FROM_WIRE[worker_pb2.DTYPE_UNSPECIFIED] = _FROM_WIRE[worker_pb2.DTYPE_FLOAT32]
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LOGITS_DTYPES = {e: d for e, (d, _) in _FROM_WIRE.items() if d.is_floating_point} | {worker_pb2.DTYPE_UNSPECIFIED: None}


def wire_dtype(number: int) -> torch.dtype | None:
    """The torch dtype a request's ``logits_dtype`` asks for; None (unspecified): each
    model's own."""
    if number not in _LOGITS_DTYPES:
        raise InvalidArgumentError(f"unknown logits dtype {number}", field="logits_dtype")
    return _LOGITS_DTYPES[number]


def dtype_enum(dtype: torch.dtype | None) -> int:
    """``wire_dtype``'s inverse."""
    return worker_pb2.DTYPE_UNSPECIFIED if dtype is None else _TO_WIRE[dtype][0]


def to_wire(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> worker_pb2.Tensor:
    """Encode ``tensor`` (cast to ``dtype``; None: as it is) as raw little-endian bytes."""
    dtype = tensor.dtype if dtype is None else dtype
    wire, numpy_dtype = _TO_WIRE[dtype]
    cast = tensor.detach().to("cpu", dtype).contiguous()
    if dtype == torch.bfloat16:
        cast = cast.view(torch.int16)
    array = cast.numpy().astype(numpy_dtype, copy=False)
    return worker_pb2.Tensor(dtype=wire, shape=list(tensor.shape), data=array.tobytes())


def from_wire(message: worker_pb2.Tensor, field: str = "tensor", data: bytes | memoryview | None = None) -> torch.Tensor:
    """Decode a Tensor message; a size that disagrees with the shape is refused. The tensor
    is a read-only view of ``data`` (the message's bytes as ``tensor_payloads`` finds them
    in the serialized message: no copy), or of the ``data`` field read once (every access of
    a bytes field copies)."""
    require(message.dtype in _FROM_WIRE, f"{field}.dtype", f"unknown dtype {message.dtype}")
    dtype, numpy_dtype = _FROM_WIRE[message.dtype]
    shape, data = tuple(message.shape), message.data if data is None else data
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


def tensor_payloads(raw: bytes, path: tuple[int, ...]) -> list[memoryview]:
    """The ``data`` of each Tensor a serialized message holds at ``path`` (field numbers
    from the message down to the Tensor, the first a repeated field), as views of ``raw``,
    one per element of that repeated field (empty where the element holds no tensor). The
    protobuf wire format read directly: parsing the message and reading each bytes field
    would copy every tensor twice."""
    view = memoryview(raw)
    return [_tensor_data(view, element, path[1:]) for element in _fields(view, 0, len(view), path[0])]


_DATA = 3  # eft.v1.Tensor.data


def _tensor_data(view: memoryview, span: tuple[int, int], path: tuple[int, ...]) -> memoryview:
    start, end = span
    if path:
        inner = _fields(view, start, end, path[0])
        return _tensor_data(view, inner[-1], path[1:]) if inner else view[0:0]
    data = _fields(view, start, end, _DATA)
    return view[data[-1][0] : data[-1][1]] if data else view[0:0]


def _fields(view: memoryview, start: int, end: int, number: int) -> list[tuple[int, int]]:
    """The (start, end) of every length-delimited field ``number`` between start and end."""
    found, position = [], start
    while position < end:
        key, position = _varint(view, position)
        wire_type = key & 7
        if wire_type == 0:
            _, position = _varint(view, position)
        elif wire_type == 1:
            position += 8
        elif wire_type == 5:
            position += 4
        elif wire_type == 2:
            length, position = _varint(view, position)
            if key >> 3 == number:
                found.append((position, position + length))
            position += length
        else:
            raise InvalidArgumentError(f"wire type {wire_type} at byte {position} is not one a worker response uses", field="response")
    return found


def _varint(view: memoryview, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = view[position]
        value |= (byte & 0x7F) << shift
        position += 1
        if byte < 0x80:
            return value, position
        shift += 7
