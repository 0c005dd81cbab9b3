"""A checkpoint's safetensors files, read one tensor (or one slice of it) at a time.

Plain file reads, no mmap: a mapped file's pages count in the process's memory while it
stays mapped, so reading every tensor of a model through mmap costs the whole model in RSS
even where each rank keeps only its shard. The format: an 8-byte little-endian header
length, a JSON header (per tensor: dtype, shape, byte offsets in the data), the data.
"""

import json
from pathlib import Path

import torch


class SafetensorsFiles:
    """A checkpoint's tensors by name, each read on its own with plain file reads: no mmap,
    whose pages would count in the process's memory while the file stays mapped."""

    DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}

    def __init__(self, entries: dict[str, tuple[Path, int, dict]]):
        self.entries = entries  # name -> (file, offset of its data, its header entry)

    @classmethod
    def of(cls, folder: Path) -> "SafetensorsFiles | None":
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            return None
        entries = {}
        for file in files:
            with open(file, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            entries |= {name: (file, 8 + size, entry) for name, entry in header.items() if name != "__metadata__"}
        return cls(entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def read(self, name: str, dim: int | None = None, start: int = 0, size: int | None = None) -> torch.Tensor:
        """The tensor, or its ``size`` entries from ``start`` along ``dim`` (0 or 1) only."""
        if name not in self.entries:
            raise KeyError(f"the checkpoint has no tensor {name!r}")
        file, base, entry = self.entries[name]
        dtype, shape, (first, last) = self.DTYPES[entry["dtype"]], list(entry["shape"]), entry["data_offsets"]
        row = (last - first) // shape[0] if shape and shape[0] else 0  # bytes of one entry along dim 0
        with open(file, "rb") as f:
            if dim is None:
                return _tensor(f, base + first, last - first, dtype, shape)
            if dim == 0:
                return _tensor(f, base + first + start * row, size * row, dtype, [size, *shape[1:]])
            out = torch.empty(shape[0], size, *shape[2:], dtype=dtype)  # columns: read blocks of rows, keep the slice
            block = max(1, BLOCK_BYTES // max(row, 1))
            for r in range(0, shape[0], block):
                n = min(block, shape[0] - r)
                out[r : r + n] = _tensor(f, base + first + r * row, n * row, dtype, [n, *shape[1:]])[:, start : start + size]
            return out


BLOCK_BYTES = 16 << 20  # what a column slice reads at once


def _tensor(f, offset: int, length: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    f.seek(offset)
    data = bytearray(f.read(length))
    return torch.frombuffer(data, dtype=dtype).reshape(shape) if data else torch.empty(shape, dtype=dtype)
