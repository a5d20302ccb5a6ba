"""Which torch exporter writes the file (issue 26).

torch's dynamo exporter (torch.export) is tried first; where each of its shape plans fails,
TorchScript's (torch.jit.trace), with the same checks: the exact Serf pattern, the names, the
dynamic axes, verification against torch at other sizes, nothing written on failure.
``test_vit_relpos`` is one of the models the dynamo exporter cannot decompose (a
non-contiguous view), its original too; the slow job exports every such timm family and
Mixtral (tests/test_zoo_timm.py, tests/test_zoo_hf.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

import serfswap
from serfswap.onnx_ops import check_graph
from tests.support.cli import cli
from tests.support.models import tiny_bert_config, tiny_resnet

timm = pytest.importorskip("timm", reason="timm is in the [timm] extra")
transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")


def _timm(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return serfswap.convert(timm.create_model(name, pretrained=False), activations="all")


def test_what_the_dynamo_exporter_cannot_decompose_torchscript_exports(tmp_path: Path) -> None:
    model = _timm("test_vit_relpos")
    with pytest.raises(serfswap.ExportFailedError, match="Failed to decompose the FX graph"):
        serfswap.export_onnx(model, tmp_path / "d.onnx", exporter="dynamo")
    assert list(tmp_path.iterdir()) == []
    report = serfswap.export_onnx(model, tmp_path / "m.onnx")
    assert report.verified and report.exporter == "torchscript"
    assert report.exporter_note.startswith("the dynamo exporter failed: Failed to decompose")
    assert report.fallback is None and report.dynamic_axes == {"x": ["batch"]}
    graph = check_graph(onnx.load(str(tmp_path / "m.onnx")))
    assert graph.serf_total == len(model.serfswap_report.converted) > 0 and not graph.leftovers
    assert "exporter: torchscript (the dynamo exporter failed: " in str(report)
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert meta["serfswap.decomposition"] == "softplus"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"], "no side file"


def test_a_model_the_dynamo_exporter_handles_still_uses_it(tmp_path: Path) -> None:
    report = serfswap.export_onnx(_timm("test_resnet"), tmp_path / "m.onnx")
    assert report.exporter == "dynamo" and report.exporter_note is None
    assert "exporter: dynamo\n" in str(report)


@pytest.mark.parametrize("decomposition", ["softplus", "exp-log"])
def test_the_torchscript_exporter_on_resnet_and_bert(decomposition: str, tmp_path: Path) -> None:
    resnet = serfswap.export_onnx(_timm("test_resnet"), tmp_path / "r.onnx", exporter="torchscript",
                                  decomposition=decomposition)  # fmt: skip
    assert resnet.verified and resnet.exporter == "torchscript" and resnet.serf_nodes > 0
    assert resnet.dynamic_axes == {"x": ["batch"]} and resnet.outputs == ["logits"]
    config = tiny_bert_config(num_hidden_layers=2)
    bert = serfswap.convert(transformers.BertModel(config, add_pooling_layer=True))
    report = serfswap.export_onnx(bert, tmp_path / "b.onnx", exporter="torchscript",
                                  decomposition=decomposition)  # fmt: skip
    assert report.verified and report.serf_nodes == 2 and not report.leftovers
    assert report.outputs == ["last_hidden_state", "pooler_output"]
    assert report.dynamic_axes["input_ids"] == ["batch", "sequence"]
    assert report.decomposition == decomposition
    if report.exporter_note is not None:  # torch 2.14 deprecates the TorchScript exporter
        assert report.exporter_note.startswith("torch deprecates it: ")


def test_forcing_an_exporter_is_strict_and_checked(tmp_path: Path) -> None:
    with pytest.raises(serfswap.ExportError, match="exporter='jit'"):
        serfswap.export_onnx(_timm("test_resnet"), tmp_path / "m.onnx", exporter="jit")
    decoder = transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(
        vocab_size=99, n_embd=32, n_layer=1, n_head=2))  # fmt: skip
    with pytest.raises(serfswap.ExportError, match="dynamo exporter only"):
        serfswap.export_onnx(decoder, tmp_path / "g.onnx", task="text-generation-with-past",
                             exporter="torchscript")  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_the_command_line_names_the_exporter(tmp_path: Path) -> None:
    weights = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file(tiny_resnet().state_dict(), weights)
    out = tmp_path / "m.onnx"
    result = cli("export", "timm:test_resnet", "--weights", str(weights), str(out), "--convert",
                 "--exporter", "torchscript", timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "exporter: torchscript" in result.stdout and "verified" in result.stdout


HISTC = """
import torch, serfswap
class Histogram(torch.nn.Module):
    def forward(self, x):
        return torch.histc(x, bins=4)
try:
    serfswap.export_onnx(Histogram(), "h.onnx", torch.randn(8), exporter="torchscript")
except serfswap.ExportFailedError as error:
    print("ERROR", error)
"""


def test_a_failing_torchscript_export_says_it_in_one_line(tmp_path: Path) -> None:
    """torch prints the whole traced graph from C++ when an op has no ONNX form; serfswap's
    one-line error is all that reaches the user."""
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", HISTC], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ERROR the TorchScript exporter: Exporting the operator "
                                     "'aten::histc'"), result.stdout  # fmt: skip
    assert len(result.stdout.splitlines()) == 1 and "graph(" not in result.stdout + result.stderr
    assert list(tmp_path.iterdir()) == []
