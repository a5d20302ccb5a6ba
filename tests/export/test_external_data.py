"""ONNX files whose weights live in a side file: what export_onnx writes above protobuf's 2 GB.

The fast tests force the layout on tiny models (``external_data=True``): the side file's name,
a stale one from an earlier export, the TorchScript exporter's one-file-per-tensor weights
gathered into one side file, a KV-cache decoder generating from its side file. The ``large``
test exports a LLaMA of 2.2 GB (fp32) for both tasks; it runs only with ``-m large`` (about 6
minutes and 5.3 GB of memory on 2 busy cores: see docs/export.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx.external_data_helper import uses_external_data
from torch import nn

import serfswap
from serfswap.errors import ExportError
from serfswap.export.request import PROTOBUF_LIMIT, weight_bytes
from serfswap.export.writers import _weights_as_ours
from serfswap.runtime.generate import generate

transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _external(path: Path) -> set[str]:
    """The side files the ONNX file at ``path`` reads its weights from."""
    proto = onnx.load(str(path), load_external_data=False)
    return {
        entry.value
        for tensor in proto.graph.initializer
        if uses_external_data(tensor)
        for entry in tensor.external_data
        if entry.key == "location"
    }


def _mlp() -> nn.Module:
    """Weights of 1 and 2 KB: above the size (256 bytes) below which a tensor stays inline."""
    return serfswap.convert(nn.Sequential(nn.Linear(4, 64), nn.GELU(), nn.Linear(64, 8)))


def test_a_new_export_takes_the_old_side_file_away(tmp_path: Path) -> None:
    """An export over one that had a side file leaves no stale weights beside the new file;
    either exporter writes its side file under the one name."""
    model, x, path = _mlp(), torch.randn(2, 4), tmp_path / "m.onnx"
    serfswap.export_onnx(model, path, x, external_data=True)
    assert _files(tmp_path) == ["m.onnx", "m.onnx.data"] and _external(path) == {"m.onnx.data"}
    report = serfswap.export_onnx(model, path, x)
    assert _files(tmp_path) == ["m.onnx"] and report.external_data is None
    assert _external(path) == set()
    report = serfswap.export_onnx(model, path, x, external_data=True, exporter="torchscript")
    assert report.verified and report.external_data == tmp_path / "m.onnx.data"
    assert _files(tmp_path) == ["m.onnx", "m.onnx.data"] and _external(path) == {"m.onnx.data"}


def test_weights_in_one_file_per_tensor_move_into_one_side_file(tmp_path: Path) -> None:
    """Above 2 GB the TorchScript exporter writes a file per tensor: they become ``m.onnx.data``
    (or go inline), tensor by tensor, and the file computes what it computed before."""
    model, x = _mlp().eval(), torch.randn(3, 4)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"])
    proto = onnx.load(str(path))
    onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=False,
              size_threshold=0)  # fmt: skip
    assert len(_files(tmp_path)) == 1 + len(proto.graph.initializer) >= 5

    def run() -> np.ndarray:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": x.numpy()})[0]

    want = run()
    for side, files in ((True, ["m.onnx", "m.onnx.data"]), (False, ["m.onnx"])):
        proto = onnx.load(str(path), load_external_data=False)
        _weights_as_ours(proto, path, side=side)
        onnx.save(proto, str(path))
        assert _files(tmp_path) == files
        assert _external(path) == set(files[1:])
        np.testing.assert_array_equal(run(), want)  # the same weights: the same numbers


def test_one_file_over_2_gb_is_refused_before_the_export(tmp_path: Path) -> None:
    with torch.device("meta"):  # 4.3 GB of weights that take no memory
        model = nn.Linear(2**15, 2**15)
    assert weight_bytes(model) > PROTOBUF_LIMIT
    with pytest.raises(ExportError, match="over protobuf's 2 GB") as caught:
        serfswap.export_onnx(model, tmp_path / "m.onnx", torch.randn(1, 2**15), external_data=False)
    assert caught.value.option == "external_data" and _files(tmp_path) == []


def _llama(**sizes: int) -> nn.Module:
    sizes = dict(num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2) | sizes
    config = transformers.LlamaConfig(tie_word_embeddings=False, **sizes)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return serfswap.convert(model, inplace=True).eval()


def _same_tokens_as_torch(model: nn.Module, path: Path, new_tokens: int) -> None:
    """onnxruntime's greedy generation from ``path`` gives torch's tokens (left padding)."""
    prompts = torch.tensor([[0, 0, 5, 17, 42], [11, 3, 64, 9, 31]])
    mask = (prompts != 0).long()
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        want = model.generate(prompts, attention_mask=mask, max_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0)  # fmt: skip
    got = generate(path, prompts, mask, max_new_tokens=new_tokens)
    np.testing.assert_array_equal(got, want.numpy())


@pytest.mark.slow  # about 30 s: a KV-cache export, verified twice, then generation
def test_a_decoder_with_its_cache_generates_from_a_side_file(tmp_path: Path) -> None:
    model = _llama(vocab_size=100, hidden_size=32, intermediate_size=48)
    path = tmp_path / "m.onnx"
    report = serfswap.export_onnx(model, path, task="text-generation-with-past", external_data=True)
    assert report.verified and report.external_data == tmp_path / "m.onnx.data"
    assert _files(tmp_path) == ["m.onnx", "m.onnx.data"] and _external(path) == {"m.onnx.data"}
    _same_tokens_as_torch(model, path, new_tokens=6)


@pytest.mark.slow
@pytest.mark.large
def test_a_llama_over_2_gb_exports_with_its_weights_in_a_side_file(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """2.2 GB of fp32 weights (a 131072 x 2048 embedding and an untied head carry 2 GiB of
    them), exported for both tasks: one side file, the graph alone under 1 MB, onnx.checker on
    the path, verified against torch, and the KV-cache file generating torch's tokens."""
    if "large" not in request.config.option.markexpr:
        pytest.skip("a 2.2 GB model (about 6 minutes, 5.3 GB of memory): run with -m large")
    model = _llama(vocab_size=131072, hidden_size=2048, intermediate_size=256,
                   num_attention_heads=16, num_key_value_heads=4)  # fmt: skip
    assert weight_bytes(model) > PROTOBUF_LIMIT
    for task in ("default", "text-generation-with-past"):
        path = tmp_path / task / "m.onnx"
        path.parent.mkdir()
        report = serfswap.export_onnx(model, path, task=task)
        assert report.verified and report.serf_nodes == 1
        assert report.external_data == path.parent / "m.onnx.data"
        assert _files(path.parent) == ["m.onnx", "m.onnx.data"]
        assert path.stat().st_size < 2**20 and _external(path) == {"m.onnx.data"}
        onnx.checker.check_model(str(path), full_check=True)
    _same_tokens_as_torch(model, tmp_path / "text-generation-with-past" / "m.onnx", 3)
