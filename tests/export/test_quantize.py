"""``export_onnx(quantize="int8")`` / ``serfswap export --quantize int8``: the verified fp32
export dynamically quantised by onnxruntime, measured against fp32 in the task's measure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import serfswap
from serfswap.cli.main import main
from serfswap.errors import InvalidChoiceError
from serfswap.onnx_ops import check_graph
from tests.zoo.hf_zoo import config

transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")
timm = pytest.importorskip("timm", reason="timm is in the [timm] extra")


def bert() -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config("bert"), attn_implementation="eager")
    return serfswap.convert(model).eval()


def weight_scales(path: Path) -> list[np.ndarray]:
    """The scales of the int8 weights (onnxruntime names them ``<weight>_scale``)."""
    proto = onnx.load(path)
    quantized = {t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    return [numpy_helper.to_array(t) for t in proto.graph.initializer
            if t.name.endswith("_scale") and t.name.removesuffix("_scale") + "_quantized"
            in quantized]  # fmt: skip


@pytest.mark.parametrize("mode", ["int8", "int8-per-tensor"])
def test_bert_int8_embedding_cosine(mode: str, tmp_path: Path) -> None:
    fp32 = serfswap.export_onnx(bert(), tmp_path / "fp32.onnx", target="cpu")
    report = serfswap.export_onnx(bert(), tmp_path / "q.onnx", target="cpu", quantize=mode)
    quant = report.quantization
    assert quant is not None and quant.measure == "embedding cosine" and quant.samples >= 2
    assert 0.9 < quant.values["min"] <= quant.values["mean"] <= 1.0 + 1e-6
    assert f"int8 (dynamic, {'per-channel' if mode == 'int8' else 'per-tensor'}" in str(report)
    assert "embedding cosine against fp32" in str(report)
    # the file in place is the int8 one, alone, with Serf kept as the CPU's decomposition
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32.onnx", "q.onnx"]
    assert report.size_bytes == (tmp_path / "q.onnx").stat().st_size < fp32.size_bytes
    proto = onnx.load(tmp_path / "q.onnx")
    assert "MatMulInteger" in {n.op_type for n in proto.graph.node}
    assert check_graph(proto).serf == {"exp-log": fp32.serf_nodes}
    assert len(proto.graph.value_info) == 0
    scales = weight_scales(tmp_path / "q.onnx")
    assert scales and all((s.size > 1) == (mode == "int8") for s in scales)


def test_classifier_top1_and_lm_logits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    resnet = serfswap.convert(timm.create_model("test_resnet", pretrained=False)).eval()
    report = serfswap.export_onnx(resnet, tmp_path / "r.onnx", quantize="int8")
    assert report.quantization is not None and report.quantization.measure == "top-1 agreement"
    assert 0.0 <= report.quantization.values["top-1 agreement"] <= 1.0

    torch.manual_seed(0)
    lm = transformers.AutoModelForCausalLM.from_config(config("gpt2"))
    lm = serfswap.convert(lm).eval()
    report = serfswap.export_onnx(lm, tmp_path / "lm.onnx", quantize="int8")
    quant = report.quantization
    assert quant is not None and quant.measure == "logits"
    assert 0.0 < quant.values["max abs diff / scale"] < 0.5
    assert quant.samples > 2  # one next-token per position


def test_bad_mode_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(InvalidChoiceError, match="int4"):
        serfswap.export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx", torch.randn(1, 2),
                             quantize="int4")  # fmt: skip
    torch.manual_seed(0)
    torch.save(serfswap.convert(timm.create_model("test_resnet")).eval(), tmp_path / "m.pt")
    code = main(["export", str(tmp_path / "m.pt"), str(tmp_path / "m.onnx"), "--quantize",
                 "int8", "--target", "cpu"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "as exp-log" in out and "top-1 agreement against fp32" in out
