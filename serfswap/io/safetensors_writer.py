"""A ``.safetensors`` file written a tensor at a time, byte for byte as safetensors writes it.

safetensors' own writer (``save_file``) takes every tensor at once: a model gathered from its
shards would have to sit whole in one process's memory first. The format does not need that:
its header (names, dtypes, shapes, offsets) depends on the tensors' dtypes and shapes only, so
it is written first, then each tensor's bytes as the tensor arrives, and dropped.

The layout is safetensors' (measured on safetensors 0.8, and checked against ``save_file`` by
tests/io/test_safetensors_writer.py): the header is JSON padded with spaces to a multiple of 8
bytes, after its length as a little-endian u64; the data follows in the order of the dtype
(safetensors' ``Dtype`` enum, widest last in the enum and first in the file), then the name.
The header's keys are sorted and it has no spaces: safetensors writes the metadata in the
order of a randomly seeded hash map, so the same weights would differ byte for byte between
runs (serfswap's checkpoints are canonical).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import BinaryIO

import torch

# safetensors' Dtype enum, in its declaration order (the file's data is in the reverse order).
_ENUM = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16",
         "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64")  # fmt: skip
_NAMES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16",
    torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32",
    torch.float32: "F32", torch.complex64: "C64", torch.float64: "F64", torch.int64: "I64",
    torch.uint64: "U64",
}  # fmt: skip

Spec = tuple[torch.dtype, tuple[int, ...]]


def file_order(specs: dict[str, Spec]) -> list[str]:
    """The names in the order their data lies in the file. Every rank of a sharded model
    computes it alike, from dtypes and shapes, to gather the tensors in this order."""
    return sorted(specs, key=lambda name: (-_ENUM.index(_dtype_name(specs[name][0])), name))


@dataclass(frozen=True)
class Layout:
    """Where each tensor goes: the header's bytes (with their length before them), and each
    tensor's size in bytes, in the file's order."""

    header: bytes
    sizes: dict[str, int]


def layout(specs: dict[str, Spec], metadata: dict[str, str]) -> Layout:
    """The file's header for tensors of these dtypes and shapes, and ``metadata``."""
    entries: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    sizes: dict[str, int] = {}
    offset = 0
    for name in file_order(specs):
        dtype, shape = specs[name]
        size = torch.Size(shape).numel() * dtype.itemsize
        entries[name] = {"dtype": _dtype_name(dtype), "shape": list(shape),
                         "data_offsets": [offset, offset + size]}  # fmt: skip
        sizes[name] = size
        offset += size
    text = json.dumps(entries, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    encoded = text.encode()
    encoded += b" " * (-len(encoded) % 8)
    return Layout(len(encoded).to_bytes(8, "little") + encoded, sizes)


class Writer:
    """Writes a file of :func:`layout`'s to ``file``: the header at once, then
    :meth:`write` each tensor in :func:`file_order`, then :meth:`finish`. A tensor out of
    order, of another dtype or shape, or a missing one is an error, never a damaged file."""

    def __init__(self, file: BinaryIO, specs: dict[str, Spec], metadata: dict[str, str]) -> None:
        self.file, self.specs = file, specs
        self.pending = file_order(specs)[::-1]  # popped from the end
        file.write(layout(specs, metadata).header)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor``'s bytes (copied to the CPU if it is elsewhere) as ``name``."""
        expected = self.pending[-1] if self.pending else None
        dtype, shape = self.specs.get(name, (None, None))
        if name != expected or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            got = f"{name} {tensor.dtype} {tuple(tensor.shape)}"
            raise ValueError(f"safetensors writer: got {got}, expected {expected} {dtype} {shape}")
        self.pending.pop()
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self.file.write(data.view(torch.uint8).numpy().data)

    def finish(self) -> None:
        """Check that every tensor was written."""
        if self.pending:
            raise ValueError(f"safetensors writer: {len(self.pending)} tensor(s) not written, "
                             f"the first {self.pending[-1]}")  # fmt: skip


def _dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(f"safetensors stores no {dtype}") from None
