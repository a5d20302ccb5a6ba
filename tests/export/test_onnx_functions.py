"""``functions=True``: every Serf as one call of the model-local ONNX function serfswap.Serf."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import serfswap
from serfswap.cli.main import main
from serfswap.onnx_ops import PATTERNS, check_graph, session
from serfswap.onnx_ops.functions import fold_into_functions
from tests.support.models import tiny_resnet
from tests.zoo.hf_zoo import config

timm = pytest.importorskip("timm", reason="timm is in the [timm] extra")
transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")

_DECOMPOSITION_OPS = {"Softplus", "Exp", "Log", "Erf"}


def resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return serfswap.convert(tiny_resnet()).eval()


def bert() -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config("bert"), attn_implementation="eager")
    return serfswap.convert(model).eval()


def outputs(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = session(path, device="cpu")
    return sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})


@pytest.mark.parametrize("decomposition", ["softplus", "exp-log"])
@pytest.mark.parametrize("build", [resnet, bert], ids=["timm-resnet", "hf-bert"])
def test_each_serf_is_one_call(build, decomposition: str, tmp_path: Path) -> None:
    model = build()
    plain = serfswap.export_onnx(model, tmp_path / "plain.onnx", decomposition=decomposition)
    report = serfswap.export_onnx(
        model, tmp_path / "fn.onnx", decomposition=decomposition, functions=True
    )
    assert report.verified and report.functions and "serfswap.Serf" in str(report)
    proto = onnx.load(tmp_path / "fn.onnx")
    calls = [n for n in proto.graph.node if (n.domain, n.op_type) == ("serfswap", "Serf")]
    assert len(calls) == report.serf_nodes == plain.serf_nodes > 0
    assert not {n.op_type for n in proto.graph.node} & _DECOMPOSITION_OPS
    (function,) = proto.functions
    body = tuple(n.op_type for n in function.node if n.op_type != "Constant")
    assert body == PATTERNS[decomposition]
    graph = check_graph(proto)
    assert graph.serf == {decomposition: len(calls)}
    assert graph.custom_domains == [] and graph.bad_functions == [] and graph.leftovers == {}
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["serfswap.functions"] == str(len(calls))
    onnx.checker.check_model(str(tmp_path / "fn.onnx"), full_check=True)

    # onnxruntime inlines the function: the same kernels, the same numbers.
    feeds = {k: v.numpy() for k, v in serfswap.inputs.example_inputs_for(model, batch=3).items()}
    got, want = outputs(tmp_path / "fn.onnx", feeds), outputs(tmp_path / "plain.onnx", feeds)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def test_with_side_file_and_fp16(tmp_path: Path) -> None:
    model = resnet()
    report = serfswap.export_onnx(
        model, tmp_path / "m.onnx", decomposition="exp-log", functions=True, external_data=True,
        dtype="fp16",
    )  # fmt: skip
    assert report.verified and report.serf_nodes == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    proto = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    assert check_graph(proto, str(tmp_path)).serf == {"exp-log": 12}
    # Serf runs in float32 inside the fp16 graph: each call sits between two Casts.
    producers = {o: n for n in proto.graph.node for o in n.output}
    calls = [n for n in proto.graph.node if n.op_type == "Serf"]
    assert all(producers[c.input[0]].op_type == "Cast" for c in calls)


def _tiny_serf_graph(extra_output: bool) -> onnx.ModelProto:
    """x -> Softplus -> Erf -> Mul(x, .) -> y, optionally with the Erf result read outside."""
    nodes = [
        helper.make_node("Softplus", ["x"], ["sp"]),
        helper.make_node("Erf", ["sp"], ["e"]),
        helper.make_node("Mul", ["x", "e"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])]
    if extra_output:
        outputs.append(helper.make_tensor_value_info("e", TensorProto.FLOAT, [4]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])], outputs
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_a_decomposition_whose_inside_is_read_elsewhere_stays_unfolded() -> None:
    model = _tiny_serf_graph(extra_output=True)
    assert fold_into_functions(model) == 0
    assert [n.op_type for n in model.graph.node] == ["Softplus", "Erf", "Mul"]
    assert not model.functions


def test_check_graph_rejects_a_function_that_is_not_serf() -> None:
    model = _tiny_serf_graph(extra_output=False)
    assert fold_into_functions(model) == 1
    assert check_graph(model).serf == {"softplus": 1}
    model.functions[0].node[1].op_type = "Tanh"  # now x * tanh(softplus(x)): Mish, not Serf
    graph = check_graph(model)
    assert graph.bad_functions == ["serfswap.Serf"] and graph.serf_total == 0
    with pytest.raises(ValueError, match="is defined already"):
        fold_into_functions(_with_function_of(model))


def _with_function_of(model: onnx.ModelProto) -> onnx.ModelProto:
    """A fresh Serf graph that also carries ``model``'s serfswap.Serf function."""
    fresh = _tiny_serf_graph(extra_output=False)
    fresh.functions.extend(model.functions)
    return fresh


def test_cli_functions_flag(tmp_path: Path, capsys) -> None:
    code = main(
        ["export", "timm:test_resnet", str(tmp_path / "m.onnx"), "--convert", "--functions"]
    )
    out = capsys.readouterr().out
    assert code == 0 and "Serf: 12" in out and "serfswap.Serf" in out
    assert {f.name for f in onnx.load(tmp_path / "m.onnx").functions} == {"Serf"}


def test_unconverted_model_gets_no_function(tmp_path: Path) -> None:
    model = tiny_resnet()
    report = serfswap.export_onnx(model, tmp_path / "m.onnx", functions=True)
    proto = onnx.load(tmp_path / "m.onnx")
    assert report.serf_nodes == 0 and not report.functions and not proto.functions
    assert report.leftovers == {"Relu": 12} and "serfswap.Serf" not in str(report)


def _exp_log_graph(
    mul_x_first: bool, one_first: bool, one: float, x_in_mul: str
) -> onnx.ModelProto:
    """x -> Exp -> Add(., 1) -> Log -> Erf -> Mul(x, .), with each commutative node's inputs in
    the order asked, the constant ``one`` and Mul reading ``x_in_mul`` as its x."""
    add_inputs = ["c", "ex"] if one_first else ["ex", "c"]
    mul_inputs = [x_in_mul, "er"] if mul_x_first else ["er", x_in_mul]
    nodes = [
        helper.make_node(
            "Constant", [], ["c"], value=helper.make_tensor("v", TensorProto.FLOAT, [], [one])
        ),
        helper.make_node("Exp", ["x"], ["ex"]),
        helper.make_node("Add", add_inputs, ["ad"]),
        helper.make_node("Log", ["ad"], ["lg"]),
        helper.make_node("Erf", ["lg"], ["er"]),
        helper.make_node("Mul", mul_inputs, ["y"]),
    ]
    info = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4]) for n in ("x", "z", "y")]
    graph = helper.make_graph(nodes, "g", info[:2], info[2:])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


@pytest.mark.parametrize("mul_x_first", [True, False])
@pytest.mark.parametrize("one_first", [True, False])
def test_the_matcher_walks_the_record_in_either_input_order(
    mul_x_first: bool, one_first: bool
) -> None:
    graph = check_graph(_exp_log_graph(mul_x_first, one_first, 1.0, "x"))
    assert graph.serf == {"exp-log": 1} and not graph.leftovers
    model = _exp_log_graph(mul_x_first, one_first, 1.0, "x")
    assert fold_into_functions(model) == 1
    assert [n.op_type for n in model.functions[0].node] == ["Constant", *PATTERNS["exp-log"]]


@pytest.mark.parametrize(("one", "x_in_mul"), [(2.0, "x"), (1.0, "z")])
def test_the_matcher_refuses_near_misses(one: float, x_in_mul: str) -> None:
    # log(exp(x) + 2), or the Mul reading another value than the Exp: not Serf.
    graph = check_graph(_exp_log_graph(True, False, one, x_in_mul))
    assert graph.serf_total == 0
    assert graph.leftovers == {"Erf outside a Serf pattern": 1}
