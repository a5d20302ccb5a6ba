"""``export_onnx(optimize=True)`` / ``serfswap export --optimize``: onnxruntime's transformer
optimizer on serfswap's export, the dynamo attention mask rewritten into a form it fuses; real
onnxruntime sessions on tiny BERT and LLaMA models from config."""

from __future__ import annotations

import inspect
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import serfswap
from serfswap.errors import ExportError, ExportMismatchError
from serfswap.onnx_ops import check_graph, session
from serfswap.onnx_ops.attention_mask import classic_attention_mask, padded_feed
from serfswap.onnx_ops.compare import compare_files

transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")

LAYERS = 2


def tiny_bert(attention: str = "eager") -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
        intermediate_size=37,
    )  # fmt: skip
    model = transformers.BertModel._from_config(config, attn_implementation=attention)
    return serfswap.convert(model).eval()


def tiny_decoder(kind: str, attention: str = "eager") -> torch.nn.Module:
    config = (
        transformers.LlamaConfig(
            vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
            num_attention_heads=4, num_key_value_heads=2,
        )
        if kind == "llama"
        else transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=LAYERS, n_head=4)
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attention)
    return serfswap.convert(model).eval()


def ops(path: Path) -> Counter[str]:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def padded_inputs(model: torch.nn.Module, batch: int = 3, seq: int = 9) -> dict[str, torch.Tensor]:
    """Token ids with padding at the end of the first row and at the start of the last."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 90, (batch, seq), generator=g)
    mask = torch.as_tensor(padded_feed({"attention_mask": np.ones((batch, seq), np.int64)})[
        "attention_mask"])  # fmt: skip
    inputs = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in inspect.signature(model.forward).parameters:
        inputs["token_type_ids"] = torch.zeros_like(ids)
    return inputs


def assert_matches_torch(model: torch.nn.Module, path: Path) -> None:
    """The file's first output on padded masks (which the export's verification, on masks of
    ones, does not use) against torch's, on the real tokens of each row."""
    sess = session(path, "cpu")
    names = {i.name for i in sess.get_inputs()}  # GPT-2's forward takes token_type_ids too
    inputs = {k: v for k, v in padded_inputs(model).items() if k in names}
    with torch.no_grad():
        want = model(**inputs)[0].numpy()
    got = sess.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    real = inputs["attention_mask"].numpy().astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def bert_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A tiny Serf BERT, exported without optimize."""
    torch.manual_seed(0)
    model = tiny_bert()
    path = tmp_path_factory.mktemp("bert") / "plain.onnx"
    serfswap.export_onnx(model, path, target="cpu")
    return model, path


@pytest.mark.slow
def test_bert_optimized_fuses_every_attention_layer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tiny_bert()
    path = tmp_path / "fused.onnx"
    report = serfswap.export_onnx(model, path, target="cpu", optimize=True)
    assert report.verified and report.optimization is not None
    assert report.optimization.fused["Attention"] == LAYERS
    assert report.optimization.masks_rewritten == LAYERS
    assert "fused Attention x2" in str(report) and "onnxruntime only" in str(report)
    found = ops(path)
    assert found["Attention"] == LAYERS and found["Softmax"] == 0  # attention is one op
    assert found["SkipLayerNormalization"] == 0  # slower on onnxruntime's CPU: left out
    proto = onnx.load(str(path))
    assert check_graph(proto).serf == {"exp-log": LAYERS}  # Serf survives the fusions
    assert {p.key: p.value for p in proto.metadata_props}["serfswap.optimized"] == "bert"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused.onnx"]  # nothing else left
    assert_matches_torch(model, path)


def test_mask_rewrite_alone_computes_the_same(
    bert_file: tuple[torch.nn.Module, Path], tmp_path: Path
) -> None:
    model, plain = bert_file
    proto = onnx.load(str(plain))
    assert classic_attention_mask(proto) == LAYERS
    kinds = Counter(n.op_type for n in proto.graph.node)
    assert kinds["GatherND"] == 0 and kinds["Where"] == 1  # the old mask subgraph is gone
    onnx.save(proto, str(tmp_path / "rewritten.onnx"))
    compare_files(plain, tmp_path / "rewritten.onnx", padded=True)
    assert_matches_torch(model, tmp_path / "rewritten.onnx")


def test_padded_check_catches_a_mask_for_right_padding_only(
    bert_file: tuple[torch.nn.Module, Path], tmp_path: Path
) -> None:
    """The optimizer's BERT default turns the mask into a count of tokens (right padding only):
    masks of ones cannot tell it from the right file, the padded check does."""
    from onnxruntime.transformers.optimizer import optimize_model

    _, plain = bert_file
    proto = onnx.load(str(plain))
    classic_attention_mask(proto)
    optimized = optimize_model(proto, model_type="bert", num_heads=2, hidden_size=32, opt_level=0)
    assert optimized.get_fused_operator_statistics()["Attention"] == LAYERS
    optimized.save_model_to_file(str(tmp_path / "mask-index.onnx"))
    compare_files(plain, tmp_path / "mask-index.onnx")  # ones: no difference shows
    with pytest.raises(ExportMismatchError):
        compare_files(plain, tmp_path / "mask-index.onnx", padded=True)


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "norm"), [("llama", "SimplifiedLayerNormalization"),
                                            ("gpt2", None)])  # fmt: skip
def test_causal_masks_are_left_alone_and_the_decoder_still_optimizes(
    kind: str, norm: str | None, tmp_path: Path
) -> None:
    """A causal mask is not padding only: the rewrite leaves it; onnxruntime 1.32 then fuses
    the decoder's norms at most (LLaMA's RMSNorms; not its attention), Serf kept, verified."""
    torch.manual_seed(0)
    model = tiny_decoder(kind)
    plain, fused = tmp_path / "plain.onnx", tmp_path / "fused.onnx"
    serfswap.export_onnx(model, plain, target="cpu")
    assert classic_attention_mask(onnx.load(str(plain))) == 0
    report = serfswap.export_onnx(model, fused, target="cpu", optimize=True)
    assert report.verified and report.optimization is not None
    assert report.optimization.masks_rewritten == 0
    # LLaMA's RMSNorms (2 per layer and the last); GPT-2's LayerNormalization was exported so
    assert report.optimization.fused == ({norm: 2 * LAYERS + 1} if norm else {})
    assert check_graph(onnx.load(str(fused))).serf == {"exp-log": LAYERS}
    assert_matches_torch(model, fused)


def test_optimize_refused_for_seq2seq_tasks(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="optimize= is for one-file exports"):
        serfswap.export_onnx(
            torch.nn.Linear(2, 2), tmp_path / "out", task="text2text-generation-with-past",
            optimize=True,
        )  # fmt: skip
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_export_optimize(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from serfswap.cli.main import main

    config = transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=37,
    )  # fmt: skip
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    code = main(["export", str(tmp_path / "bert"), str(tmp_path / "out.onnx"), "--convert",
                 "--target", "cpu", "--optimize"])  # fmt: skip
    assert code == 0
    assert "fused Attention x1" in capsys.readouterr().out
    assert ops(tmp_path / "out.onnx")["Attention"] == 1
