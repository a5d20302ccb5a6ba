"""Issue #30's ONNX side: files without intermediate ``value_info``, the decomposition chosen
by ``target=``, and ``serfswap rewrite`` of Serf patterns in files exported elsewhere
(``torch.onnx.export``'s two exporters), each checked on real onnxruntime sessions."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import serfswap
from serfswap.cli.main import main
from serfswap.errors import ExportError, ExportMismatchError, InvalidChoiceError
from serfswap.onnx_ops import check_graph, session
from serfswap.onnx_ops.compare import compare_files, random_feed
from serfswap.onnx_ops.decompositions import TARGETS, choose
from serfswap.onnx_ops.retarget import retarget, retarget_file
from serfswap.onnx_ops.value_info import strip_value_info, strip_value_info_file
from tests.zoo.hf_zoo import config

transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")


def bert(convert: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config("bert"), attn_implementation="eager")
    return (serfswap.convert(model) if convert else model).eval()


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(6, 6), serfswap.Serf(), torch.nn.Linear(6, 3), serfswap.Serf()]
    return torch.nn.Sequential(*layers).eval()


def torch_export(model: torch.nn.Module, path: Path, *, dynamo: bool) -> Path:
    """The model as a user exports it without serfswap: plain ``torch.onnx.export``."""
    x = torch.randn(2, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, (x,), path, dynamo=True, external_data=False,
                              input_names=["x"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},))  # fmt: skip
        else:
            torch.onnx.export(model, (x,), path, dynamo=False, input_names=["x"],
                              dynamic_axes={"x": {0: "batch"}})  # fmt: skip
    return path


def run(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = session(path, "cpu")
    return sess.run(None, {i.name: feed[i.name] for i in sess.get_inputs()})


# value_info ------------------------------------------------------------------------------------


@pytest.mark.parametrize("convert", [False, True], ids=["original", "serf"])
def test_exports_keep_shapes_of_inputs_and_outputs_only(convert: bool, tmp_path: Path) -> None:
    report = serfswap.export_onnx(bert(convert), tmp_path / "m.onnx")
    assert report.verified  # onnx.checker (full) and onnxruntime ran on the stripped file
    proto = onnx.load(tmp_path / "m.onnx")
    assert len(proto.graph.value_info) == 0
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*proto.graph.input, *proto.graph.output]]  # fmt: skip
    assert dims[0] == ["batch", "sequence"]  # the interface keeps its named shapes
    assert all(dims) and all(all(d for d in shape) for shape in dims)


def test_strip_value_info_changes_no_output(tmp_path: Path) -> None:
    path = torch_export(mlp(), tmp_path / "m.onnx", dynamo=True)
    proto = onnx.load(path)
    inferred = onnx.shape_inference.infer_shapes(proto)
    assert len(inferred.graph.value_info) > 0
    onnx.save(inferred, tmp_path / "vi.onnx")
    assert strip_value_info_file(tmp_path / "vi.onnx") == len(inferred.graph.value_info)
    assert strip_value_info(onnx.load(tmp_path / "vi.onnx")) == 0
    onnx.checker.check_model(str(tmp_path / "vi.onnx"), full_check=True)
    feed = {"x": np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)}
    np.testing.assert_array_equal(run(path, feed)[0], run(tmp_path / "vi.onnx", feed)[0])


# target= ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", list(TARGETS))
def test_target_picks_its_decomposition(target: str, tmp_path: Path) -> None:
    model = mlp()
    report = serfswap.export_onnx(model, tmp_path / "m.onnx", example_inputs=torch.randn(2, 6),
                                  target=target)  # fmt: skip
    assert report.decomposition == TARGETS[target] and report.verified
    assert check_graph(onnx.load(tmp_path / "m.onnx")).serf == {TARGETS[target]: 2}
    assert f"as {TARGETS[target]}" in str(report) and f"the faster on {target}" in str(report)


def test_target_and_decomposition_must_agree() -> None:
    assert choose(None, None) == "softplus"
    assert choose("exp-log", "cpu") == choose(None, "cpu") == "exp-log"
    assert choose(None, "cuda") == "softplus"
    with pytest.raises(ValueError, match="disagree"):
        choose("softplus", "cpu")
    with pytest.raises(ValueError, match="target='tpu'"):
        choose(None, "tpu")
    with pytest.raises(ExportError, match="disagree"):
        serfswap.export_onnx(mlp(), "never.onnx", torch.randn(2, 6), decomposition="softplus",
                             target="cpu")  # fmt: skip
    assert not Path("never.onnx").exists()


# rewrite ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("target", list(TARGETS))
def test_rewrite_files_exported_by_torch(dynamo: bool, target: str, tmp_path: Path) -> None:
    source = torch_export(mlp(), tmp_path / "torch.onnx", dynamo=dynamo)
    assert check_graph(onnx.load(source)).serf == ({} if dynamo else {"softplus": 2})
    result = retarget_file(source, tmp_path / "out.onnx", target=target)
    # the dynamo exporter writes F.softplus with its threshold: Where(Greater(x, 20), x, ...)
    assert result.found == {("softplus-threshold" if dynamo else "softplus"): 2}
    assert result.rewritten == 2 and result.left == 0
    assert result.max_abs_diff is not None and max(result.max_abs_diff.values()) < 1e-5
    proto = onnx.load(tmp_path / "out.onnx")
    graph = check_graph(proto)
    assert graph.serf == {TARGETS[target]: 2} and not graph.leftovers
    assert not {"Where", "Greater"} & {n.op_type for n in proto.graph.node}
    feed = {"x": np.random.default_rng(1).uniform(-30, 30, (4, 6)).astype(np.float32)}
    want = mlp()(torch.from_numpy(feed["x"])).detach().numpy()
    np.testing.assert_allclose(run(tmp_path / "out.onnx", feed)[0], want, atol=1e-5)


def test_rewrite_a_serfswap_bert_both_ways(tmp_path: Path) -> None:
    model = bert()
    serfswap.export_onnx(model, tmp_path / "cuda.onnx", target="cuda")
    cpu = retarget_file(tmp_path / "cuda.onnx", tmp_path / "cpu.onnx", decomposition="exp-log")
    back = retarget_file(tmp_path / "cpu.onnx", tmp_path / "back.onnx", target="cuda")
    layers = model.config.num_hidden_layers
    assert cpu.found == {"softplus": layers} and back.found == {"exp-log": layers}
    assert check_graph(onnx.load(tmp_path / "cpu.onnx")).serf == {"exp-log": layers}
    # exp-log's constant 1 is typed as x and the old one is gone
    back_proto = onnx.load(tmp_path / "back.onnx")
    assert not [t for t in back_proto.graph.initializer if t.name.startswith("serfswap_one")]
    feed = random_feed(session(tmp_path / "cuda.onnx", "cpu"), seed=3)
    for a, b in zip(run(tmp_path / "cuda.onnx", feed), run(tmp_path / "back.onnx", feed),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)  # the same graph again


def test_rewrite_a_function_body(tmp_path: Path) -> None:
    serfswap.export_onnx(mlp(), tmp_path / "fn.onnx", torch.randn(2, 6), functions=True)
    result = retarget_file(tmp_path / "fn.onnx", tmp_path / "out.onnx", target="cpu")
    assert result.function == "softplus" and result.rewritten == 2
    proto = onnx.load(tmp_path / "out.onnx")
    assert check_graph(proto).serf == {"exp-log": 2} and check_graph(proto).bad_functions == []
    assert sum(n.op_type == "Serf" for n in proto.graph.node) == 2


def test_a_pattern_read_inside_is_left(tmp_path: Path) -> None:
    # Serf(x) whose Softplus is also a graph output: rewriting it would remove that output.
    nodes = [helper.make_node("Softplus", ["x"], ["s"]), helper.make_node("Erf", ["s"], ["e"]),
             helper.make_node("Mul", ["x", "e"], ["y"])]  # fmt: skip
    io = {n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [3]) for n in "xsy"}
    graph = helper.make_graph(nodes, "g", [io["x"]], [io["y"], io["s"]])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    result = retarget(model, "exp-log")
    assert result.found == {"softplus": 1} and result.left == 1 and result.rewritten == 0
    assert [n.op_type for n in model.graph.node] == ["Softplus", "Erf", "Mul"]
    with pytest.raises(InvalidChoiceError):
        retarget(model, "mish")


def test_verification_catches_another_function(tmp_path: Path) -> None:
    source = torch_export(mlp(), tmp_path / "serf.onnx", dynamo=False)
    proto = onnx.load(source)
    for node in proto.graph.node:  # Serf -> x * tanh(softplus(x)): Mish, 0.076 away
        if node.op_type == "Erf":
            node.op_type = "Tanh"
    onnx.save(proto, tmp_path / "mish.onnx")
    with pytest.raises(ExportMismatchError, match="differs"):
        compare_files(source, tmp_path / "mish.onnx")


def test_rewrite_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = torch_export(mlp(), tmp_path / "in.onnx", dynamo=True)
    assert main(["rewrite", str(source), str(tmp_path / "out.onnx"), "--target", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "softplus-threshold x2; 2 now exp-log" in out and "verified with onnxruntime" in out
    with pytest.raises(SystemExit):  # one of --target / --decomposition, not both
        main(["rewrite", str(source), str(tmp_path / "o.onnx"), "--target", "cpu",
              "--decomposition", "exp-log"])  # fmt: skip
    assert main(["rewrite", str(tmp_path / "nothing.onnx"), str(tmp_path / "o.onnx"),
                 "--target", "cpu"]) != 0  # fmt: skip
    assert not (tmp_path / "o.onnx").exists()
