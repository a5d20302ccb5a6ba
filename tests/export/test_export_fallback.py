"""Dynamic shapes that break fall back to static ones, with a clear word (issue 18).

The six models below export with dynamic batch and sequence, but the graph cannot run at
another size (PEGASUS-X, Mamba, FalconMamba), the exporter's own pass fails (ProphetNet), or
the graph bakes a size in (RWKV, RecurrentGemma) — with their original activations as with
Serf. ``export_onnx`` falls back to a dynamic batch with a static sequence, and says so.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

import serfswap
from tests.support.cli import cli
from tests.support.models import tiny_bert_config
from tests.zoo.hf_zoo import SHAPE_FALLBACK as CONFIGS

transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")
onnx = pytest.importorskip("onnx")

# Why the dynamic export fails, as the report says it.
REASONS = {
    "pegasus_x": "onnxruntime cannot run the exported graph",
    "prophetnet": "the exporter: An error occurred when running the 'onnx_ir.passes.PassManager'",
    "mamba": "onnxruntime cannot run the exported graph",
    "falcon_mamba": "onnxruntime cannot run the exported graph",
    "rwkv": "onnxruntime differs from torch",
    "recurrent_gemma": "onnxruntime differs from torch",
}


def build(model_type: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **CONFIGS[model_type])
    model = transformers.AutoModel.from_config(config, attn_implementation="eager").eval()
    ids = torch.randint(3, 99, (2, 8))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = ids[:, :4]
    if model_type == "prophetnet":  # its `1.0 - mask` fails to export with an integer mask
        inputs["attention_mask"] = inputs["attention_mask"].float()
    return serfswap.convert(model), inputs


FAST = {"mamba"}  # one model in the main job; the rest run in the slow job


@pytest.mark.parametrize(
    "model_type",
    [m if m in FAST else pytest.param(m, marks=pytest.mark.slow) for m in CONFIGS],
)
def test_broken_dynamic_shapes_fall_back_to_a_static_sequence(
    model_type: str, tmp_path: Path
) -> None:
    model, inputs = build(model_type)
    path = tmp_path / "m.onnx"
    report = serfswap.export_onnx(model, path, inputs)
    assert report.verified and path.is_file()
    assert report.fallback is not None and REASONS[model_type] in report.fallback
    assert report.fallback.endswith("exported with dynamic batch, static sequence shapes")
    assert all(axes == ["batch"] for axes in report.dynamic_axes.values()), report.dynamic_axes
    assert f"shapes: dynamic failed: {REASONS[model_type]}" in str(report)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"], "no staging folder left"
    with pytest.raises(serfswap.ExportError) as info:  # a mismatch is one too
        serfswap.export_onnx(model, tmp_path / "strict.onnx", inputs, dynamic=True)
    assert REASONS[model_type] in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "strict.onnx").exists()


def test_a_model_whose_dynamic_export_works_stays_dynamic(tmp_path: Path) -> None:
    cfg = tiny_bert_config()
    model = serfswap.convert(transformers.BertModel(cfg))
    report = serfswap.export_onnx(model, tmp_path / "bert.onnx")
    assert report.fallback is None
    assert report.dynamic_axes["input_ids"] == ["batch", "sequence"]


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return cli(*argv, timeout=600)  # a model that fails dynamic export is exported twice


@pytest.mark.long
def test_cli_says_it_in_one_line_without_onnxruntime_log(tmp_path: Path) -> None:
    model, _ = build("mamba")
    serfswap.revert(model).save_pretrained(tmp_path / "mamba")
    result = _cli("export", str(tmp_path / "mamba"), str(tmp_path / "m.onnx"), "--convert")
    assert result.returncode == 0, result.stderr
    assert "shapes: dynamic failed: onnxruntime cannot run the exported graph" in result.stdout
    assert "[E:onnxruntime" not in result.stderr and "\x1b[" not in result.stderr, result.stderr
    strict = _cli("export", str(tmp_path / "mamba"), str(tmp_path / "s.onnx"), "--dynamic")
    assert strict.returncode == 1
    # Ours is one line, the last; transformers' own warnings about Mamba's kernels may precede.
    ours = [line for line in strict.stderr.splitlines() if line.startswith("serfswap ")]
    assert len(ours) == 1 and strict.stderr.strip().endswith(ours[0]), strict.stderr
    assert "onnxruntime cannot run the exported graph" in ours[0] and "Traceback" not in ours[0]
    assert ours[0].endswith("; try --static")
    assert "[E:onnxruntime" not in strict.stderr and "\x1b[" not in strict.stderr
    # --dynamic: the failing attempt is what has onnxruntime's log (no static export after it)
    shown = _cli("export", str(tmp_path / "mamba"), str(tmp_path / "d.onnx"), "--dynamic",
                 "--debug")  # fmt: skip
    assert shown.returncode == 1 and "[E:onnxruntime" in shown.stderr, "--debug shows its log"
    assert not (tmp_path / "s.onnx").exists() and not (tmp_path / "d.onnx").exists()


@pytest.mark.slow
@pytest.mark.long
def test_cli_exit_status_1_when_nothing_can_be_exported(tmp_path: Path) -> None:
    """ProphetNet with an integer attention mask (what the CLI infers) fails in the dynamo
    exporter whatever the shapes: with that exporter alone every plan is tried, and the error
    is one line. By default the TorchScript exporter then exports it, and says why."""
    config = transformers.AutoConfig.for_model("prophetnet", **CONFIGS["prophetnet"])
    transformers.AutoModel.from_config(config).save_pretrained(tmp_path / "pn")
    out = str(tmp_path / "m.onnx")
    result = _cli("export", str(tmp_path / "pn"), out, "--exporter", "dynamo")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "static failed" not in lines[0], lines
    assert "the exporter:" in lines[0] and "(before: dynamic failed:" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pn"]
    fallback = _cli("export", str(tmp_path / "pn"), out)
    assert fallback.returncode == 0, fallback.stderr
    assert "exporter: torchscript (the dynamo exporter failed: " in fallback.stdout
    assert "verified with onnxruntime" in fallback.stdout
