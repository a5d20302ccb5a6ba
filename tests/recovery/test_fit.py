"""Fitting each Serf to the activation it replaced (serfswap.recovery.fit): the scales fold
into the neighbouring layers exactly, bring the converted model towards the original, and a
fold that would change anything else is refused."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import serfswap
from serfswap.ops.serf import Serf, serf
from serfswap.recovery import fit
from serfswap.rewrite.walk import converted_serfs, put
from tests.support.models import tiny_bert_config, tiny_resnet

transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")
CPU = torch.device("cpu")


class _Scaled(nn.Module):
    """``a * Serf(b * x)``: what a fitted Serf computes before its scales are folded."""

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a * serf(self.b * x)


def _unfolded(converted: nn.Module, fits: list[fit.Fit]) -> nn.Module:
    """A copy of ``converted`` (before the fit) with each folded Serf replaced by _Scaled."""
    reference = copy.deepcopy(converted)
    by_name = {f.name: f for f in fits if f.folded}
    names = {id(m): n for n, m in reference.named_modules()}
    for module, refs in converted_serfs(reference):
        found = by_name.get(names[id(module)])
        if found is not None:
            put(refs, _Scaled(found.a, found.b))
    return reference


def _bert() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    config = tiny_bert_config(vocab_size=64, initializer_range=0.2)  # trained-like magnitudes
    teacher = transformers.BertModel(config).eval()
    ids = torch.randint(1, 64, (4, 12))
    return teacher, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_bert_folds_into_the_dense_layers_and_computes_the_fitted_serfs() -> None:
    teacher, batch = _bert()
    converted = serfswap.convert(teacher)
    student = copy.deepcopy(converted)
    fits = fit.fit_activations(student, [batch], CPU)
    assert len(fits) == teacher.config.num_hidden_layers and all(f.folded for f in fits), fits
    # GELU's knee: Serf needs its input scaled up and its output down. (The error falls by
    # 3 to 4x at this random model's small pre-activations; by 45x on MiniLM's, RESULTS.md.)
    # One pair per channel of the 37 intermediate units (Linear -> GELU -> Linear).
    for f in fits:
        assert f.a.shape == f.b.shape == (teacher.config.intermediate_size,)
        assert 1.3 < f.b.median() < 2.2 and 0.35 < f.a.median() < 0.7, f
        assert f.error < f.error_plain / 3, f
    with torch.no_grad():
        folded = student(**batch).last_hidden_state
        fitted = _unfolded(converted, fits)(**batch).last_hidden_state
        original = teacher(**batch).last_hidden_state
        plain = converted(**batch).last_hidden_state
    torch.testing.assert_close(folded, fitted, rtol=1e-4, atol=1e-5)
    layer = fits[0].name.rsplit(".", 2)[0]  # encoder.layer.0
    weights = dict(student.named_parameters())
    old = dict(converted.named_parameters())
    torch.testing.assert_close(weights[f"{layer}.intermediate.dense.bias"],
                               old[f"{layer}.intermediate.dense.bias"] * fits[0].b)  # fmt: skip
    torch.testing.assert_close(weights[f"{layer}.output.dense.weight"],
                               old[f"{layer}.output.dense.weight"] * fits[0].a)  # fmt: skip
    assert torch.equal(weights[f"{layer}.output.dense.bias"], old[f"{layer}.output.dense.bias"])
    closer = F.mse_loss(folded, original) / F.mse_loss(plain, original)
    assert closer < 1 / 3, f"the output's error to the original's only fell to {closer:.0%}"


def test_llama_gated_mlp_takes_the_output_scale_in_up_proj() -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, initializer_range=0.2)  # fmt: skip
    teacher = transformers.LlamaForCausalLM(config).eval()
    converted = serfswap.convert(teacher)
    student = copy.deepcopy(converted)
    batch = {"input_ids": torch.randint(0, 64, (2, 10))}
    fits = fit.fit_activations(student, [batch], CPU)
    assert all(f.folded for f in fits) and len(fits) == 2, fits
    old, new = dict(converted.named_parameters()), dict(student.named_parameters())
    for i, f in enumerate(fits):
        mlp = f"model.layers.{i}.mlp"
        # One scale per intermediate unit: rows of gate_proj and up_proj ([units, hidden]).
        assert f.b.shape == (48,)
        for layer, scale in (("gate_proj", f.b[:, None]), ("up_proj", f.a[:, None])):
            key = f"{mlp}.{layer}.weight"
            torch.testing.assert_close(new[key], old[key] * scale, msg=key)
        assert torch.equal(new[f"{mlp}.down_proj.weight"], old[f"{mlp}.down_proj.weight"])
    with torch.no_grad():
        torch.testing.assert_close(student(**batch).logits,
                                   _unfolded(converted, fits)(**batch).logits,
                                   rtol=1e-4, atol=1e-5)  # fmt: skip


class _PreActivationResidual(nn.Module):
    """fc1's output goes to the activation *and* around it: folding b into fc1 would scale
    the residual too, so the fold must be refused."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc1(x)
        return self.fc2(self.act(y)) + y


def test_a_fold_that_changes_anything_else_is_refused_and_undone() -> None:
    torch.manual_seed(0)
    converted = serfswap.convert(_PreActivationResidual())
    before = copy.deepcopy(converted.state_dict())
    fits = fit.fit_activations(converted, [torch.randn(16, 8) * 3], CPU)
    assert len(fits) == 1 and not fits[0].folded
    assert "does not compute" in fits[0].reason and fits[0].error < fits[0].error_plain
    for key, value in converted.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} must be restored exactly"
    assert "no Serf fitted" in fit.summary(fits)


def test_resnet_folds_where_a_layer_produces_and_one_consumes() -> None:
    torch.manual_seed(0)
    teacher = tiny_resnet().eval()
    converted = serfswap.convert(teacher)
    student = copy.deepcopy(converted)
    x = torch.randn(2, 3, 48, 48)
    fits = fit.fit_activations(student, [x], CPU)
    folded = [f for f in fits if f.folded]
    # act1 of a block: bn1 -> act1 -> conv2 folds; act2 after the residual add has no producer.
    assert folded and len(folded) < len(fits), fits
    assert all(f.b.dim() == 0 for f in fits), "convolutions' channels are not last: one scale"
    assert all(fit.B_RANGE[0] <= f.b <= fit.B_RANGE[1] for f in folded)
    assert all(f.reason for f in fits if not f.folded)
    with torch.no_grad():
        torch.testing.assert_close(student(x), _unfolded(converted, fits)(x), rtol=1e-4, atol=1e-5)


def test_recover_fits_first_and_reports_it(caplog: pytest.LogCaptureFixture) -> None:
    teacher, batch = _bert()
    student = serfswap.convert(teacher)
    with caplog.at_level("INFO", logger="serfswap"):
        result = serfswap.recover(student, teacher, [batch], steps=1, eval_data=[batch],
                                  progress=False)  # fmt: skip
    layers = teacher.config.num_hidden_layers
    assert f"fitted {layers} Serf" in caplog.text and "after the fit" in caplog.text
    assert result.fitted["cosine"] > result.before["cosine"]
    plain = serfswap.recover(serfswap.convert(teacher), teacher, [batch], steps=1,
                             eval_data=[batch], fit_batches=0, progress=False)  # fmt: skip
    assert plain.fitted == {}
    assert all(isinstance(m, Serf) for m, _ in converted_serfs(student)), "still plain Serfs"


def test_layer_matching_compares_a_holder_whose_output_is_the_serf_in_the_original_scale() -> None:
    """BertIntermediate's output is its activation's: after the fit it is Serf(b x), 1/a
    times the original's GELU(x), so layer matching scales it by a; LLaMA's MLP holds
    ``up`` (which took a), so its output needs nothing."""
    teacher, batch = _bert()
    student = serfswap.convert(teacher)
    fits = fit.fit_activations(student, [batch], CPU)
    scales = fit.holder_scales(fits)
    assert scales == {f"encoder.layer.{i}.intermediate": f.a.tolist() for i, f in enumerate(fits)}
    from serfswap.recovery.distill import LayerTaps, converted_parents

    losses = []
    for given in (scales, {}):
        taps = LayerTaps(converted_parents(student), student, teacher, given)
        with torch.no_grad():
            student(**batch), teacher(**batch)
        losses.append(float(taps.loss()))
        taps.remove()
    assert losses[0] < 0.05, "the fitted student matches its original layer by layer"
    assert losses[1] > 5 * losses[0], "unscaled, Serf(b x) is 1/a times GELU(x) (a ~ 0.5)"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, initializer_range=0.2)  # fmt: skip
    llama = serfswap.convert(transformers.LlamaForCausalLM(config).eval())
    fits = fit.fit_activations(llama, [{"input_ids": torch.randint(0, 64, (2, 10))}], CPU)
    assert fits[0].folded and fit.holder_scales(fits) == {}


def test_the_default_learning_rate_follows_the_kind_of_model() -> None:
    """After the fit an embedding model starts close to its original: its default peak rate
    is 2e-5 (measured, RESULTS.md); a classifier's is 1e-4; a given rate is used as it is."""
    from serfswap.options import LR_BY_KIND

    teacher, batch = _bert()  # hidden states: an embedding model
    runs = {"embedding": serfswap.recover(serfswap.convert(teacher), teacher, [batch], steps=2,
                                          warmup=0.0, progress=False)}  # fmt: skip
    given = serfswap.recover(serfswap.convert(teacher), teacher, [batch], steps=2, warmup=0.0,
                             lr=1e-3, progress=False)  # fmt: skip
    classifier = tiny_resnet(num_classes=5).eval()
    runs["classifier"] = serfswap.recover(serfswap.convert(classifier), classifier,
                                          [torch.randn(4, 3, 32, 32)], steps=2, warmup=0.0,
                                          progress=False)  # fmt: skip
    for kind, result in runs.items():  # step 1 of a cosine decay with no warmup: the peak
        assert result.history[0]["lr"] == pytest.approx(LR_BY_KIND[kind]), kind
    assert LR_BY_KIND["embedding"] < LR_BY_KIND["classifier"]
    assert given.history[0]["lr"] == pytest.approx(1e-3)
