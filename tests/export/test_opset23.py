"""``export_onnx(opset=23)`` / ``serfswap export --opset 23``: torch writes
scaled_dot_product_attention as ONNX's standard ``Attention`` op (no com.microsoft op, nothing
onnxruntime-only), which onnxruntime's CPU runs as one kernel: a KV-cache decoder's new token
in 0.62x-0.70x the opset-20 file's time (benchmarks/RESULTS.md). Real exports of tiny BERT,
GPT-2 and LLaMA (transformers' default SDPA attention) run in onnxruntime on padded masks."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
import pytest
import torch

import serfswap
from serfswap.names import SEQUENCE
from serfswap.onnx_ops import check_graph

from .test_optimize import LAYERS, assert_matches_torch, tiny_bert, tiny_decoder

transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")


def tiny(kind: str) -> torch.nn.Module:
    """A tiny Serf model with transformers' default attention, SDPA."""
    torch.manual_seed(0)
    return tiny_bert("sdpa") if kind == "bert" else tiny_decoder(kind, "sdpa")


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_opset_23_writes_standard_attention_at_any_sequence_length(
    kind: str, tmp_path: Path
) -> None:
    """Every layer's attention is one standard Attention node, the sequence stays dynamic, and
    the file matches torch on masks padded left and right. For LLaMA this needs the export to
    skip onnxscript's RotaryEmbedding fusion, which onnxruntime 1.32 cannot run at a sequence
    length other than the traced one (the export then fell back to a static sequence)."""
    model = tiny(kind)
    path = tmp_path / "m.onnx"
    report = serfswap.export_onnx(model, path, opset=23, target="cpu")
    assert report.verified and report.fallback is None, report
    assert all(SEQUENCE in axes for axes in report.dynamic_axes.values()), report.dynamic_axes
    proto = onnx.load(str(path))
    found = Counter((n.domain or "", n.op_type) for n in proto.graph.node)
    assert found[("", "Attention")] == LAYERS and found[("", "Softmax")] == 0
    assert found[("", "RotaryEmbedding")] == 0
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)  # standard ONNX only
    assert check_graph(proto).serf == {"exp-log": LAYERS}
    assert_matches_torch(model, path)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_opset_23_kv_cache_decoder(kind: str, tmp_path: Path) -> None:
    """The decoder with its KV cache (what ``serfswap generate`` runs): one Attention per layer
    over the cache and the new tokens, verified, cache and sequence dynamic."""
    path = tmp_path / "m.onnx"
    report = serfswap.export_onnx(
        tiny(kind), path, opset=23, target="cpu", task="text-generation-with-past"
    )
    assert report.verified and report.fallback is None, report
    assert report.dynamic_axes["past_key_values.0.key"] == ["batch", "past_sequence"]
    assert report.dynamic_axes["input_ids"] == ["batch", SEQUENCE]
    proto = onnx.load(str(path))
    assert Counter(n.op_type for n in proto.graph.node)["Attention"] == LAYERS
    assert check_graph(proto).serf == {"exp-log": LAYERS}
