"""The streaming safetensors writer: byte for byte what safetensors' own ``save_file`` /
``save_model`` write (with the header's keys sorted, as serfswap's checkpoints are), every dtype
in safetensors' order; ``save_checkpoint`` and ``fsdp.save_consolidated`` (in one process) write
the same file; a wrong or missing tensor leaves nothing behind."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

import serfswap
from serfswap.io.checkpoint import checkpoint_metadata, checkpoint_writer
from serfswap.io.safetensors_writer import Writer, file_order
from serfswap.recovery import fsdp
from tests.io.test_checkpoint import converted_resnet, tied_gpt2

safetensors_torch = pytest.importorskip("safetensors.torch")


def canonical(raw: bytes) -> bytes:
    """safetensors' file with its header's keys sorted (same length: the data does not move),
    as serfswap's checkpoints have been written since safetensors' metadata order varies."""
    size = int.from_bytes(raw[:8], "little")
    text = json.dumps(json.loads(raw[8 : 8 + size]), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()  # fmt: skip
    assert len(text) <= size
    return raw[:8] + text.ljust(size, b" ") + raw[8 + size :]


def streamed(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    writer = Writer(buffer, specs, metadata)
    for name in file_order(specs):
        writer.write(name, tensors[name])
    writer.finish()
    return buffer.getvalue()


def test_every_dtype_byte_for_byte_as_safetensors_writes_it(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    dtypes = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.uint16, torch.float16,
              torch.bfloat16, torch.int32, torch.uint32, torch.float32, torch.float64,
              torch.int64, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2,
              torch.complex64]  # fmt: skip
    tensors = {}
    for i, dtype in enumerate(dtypes):  # names out of dtype order, shapes of several ranks
        values = torch.randn(3, i % 3 + 1, generator=g) * 50
        tensors[f"{'zb'[i % 2]}.{i}"] = values.to(dtype)
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.zeros(0, 4)
    tensors["strided"] = torch.arange(12.0).reshape(3, 4).t()  # written contiguous
    metadata = {"b": "2", "a": "1 é"}
    reference = tmp_path / "ref.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(reference),
                                metadata)  # fmt: skip
    assert streamed(tensors, metadata) == canonical(reference.read_bytes())


def test_save_checkpoint_is_save_model_with_a_canonical_header(tmp_path: Path) -> None:
    """Tied weights stored once under the name save_model keeps, the dropped name in the
    metadata as save_model records it; BatchNorm's int64 counters after the float32 data."""
    for model in (tied_gpt2(), converted_resnet()):
        ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
        serfswap.save_checkpoint(model, ours, metadata={"note": "x"})
        entries = checkpoint_metadata(model, None, {"note": "x"})
        safetensors_torch.save_model(model, str(theirs), metadata=entries)
        assert ours.read_bytes() == canonical(theirs.read_bytes())
        # save_consolidated on an unsharded model, in a process without a group: the same.
        streamed_file = tmp_path / "streamed.safetensors"
        assert fsdp.save_consolidated(model, streamed_file, metadata={"note": "x"})
        assert streamed_file.read_bytes() == ours.read_bytes()
        gathered = tmp_path / "gathered.safetensors"
        serfswap.save_checkpoint(model, gathered, tensors=fsdp.full_state_dict(model),
                                 metadata={"note": "x"})  # fmt: skip
        assert gathered.read_bytes() == ours.read_bytes()


def test_a_wrong_or_missing_tensor_leaves_nothing(tmp_path: Path) -> None:
    specs = {"a": (torch.float32, (2,)), "b": (torch.int64, (1,))}
    out = tmp_path / "x.safetensors"
    wrong = r"got a torch.float32 \(2,\), expected b"
    with pytest.raises(ValueError, match=wrong), checkpoint_writer(out, specs, {}, {}) as writer:
        writer.write("a", torch.zeros(2))  # b (int64) comes first
    missing = r"1 tensor\(s\) not written, the first a"
    with pytest.raises(ValueError, match=missing), checkpoint_writer(out, specs, {}, {}) as writer:
        writer.write("b", torch.zeros(1, dtype=torch.int64))
    assert list(tmp_path.iterdir()) == [], "no file, no staging folder"
