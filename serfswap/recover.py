"""recover(): a short fine-tune, taught by the original model, that gives back what the swap took.

The teacher is the original model, frozen and in eval mode; no labels are needed. The student
learns to reproduce the teacher's outputs (KL with temperature on logits; MSE plus cosine on
embeddings and hidden states) and, with ``layer_weight``, the outputs of the modules whose
activations were converted (forward hooks on both models, normalised by the teacher's variance).
Batches that carry labels add the task loss. AdamW, linear warmup then cosine decay, gradient
clipping. Options: a blend ramp (each converted module computes ``a * serf(x) + (1 - a) *
original(x)``, ``a`` going from 0 to 1 over the first part of the run) and, for networks with
BatchNorm, re-estimating the running statistics before fine-tuning.

Scope of this version: single process, no checkpoints or resume yet (see the README).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .convert import _ORIGINAL_ATTR, _walk
from .errors import InvalidArgumentError
from .modes import eval_mode
from .serf import Serf

OUTPUT_LOSSES = ("auto", "kl", "mse-cosine")


# Batches and outputs ---------------------------------------------------------------------------


def _split(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any], Tensor | None]:
    """(args, kwargs, labels) of a batch: a tensor, (inputs, labels), or a dict of tensors."""
    if isinstance(batch, Tensor):
        return (batch,), {}, None
    if isinstance(batch, dict):
        kwargs = dict(batch)
        labels = kwargs.pop("labels", None)
        return (), kwargs, labels
    if isinstance(batch, list | tuple) and batch:
        labels = batch[1] if len(batch) > 1 else None
        return (batch[0],), {}, labels
    raise InvalidArgumentError(
        f"a batch must be a tensor, a tuple (inputs, labels) or a dict, not {type(batch).__name__}"
    )


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _primary(output: Any) -> tuple[str, Tensor]:
    """The output to distil and its kind: logits, a pooled embedding, or hidden states."""
    if isinstance(output, Tensor):
        return "tensor", output
    if isinstance(output, dict):
        for key in ("logits", "pooler_output", "last_hidden_state"):
            value = output.get(key)
            if isinstance(value, Tensor):
                return key, value
        output = tuple(output.values())
    if isinstance(output, list | tuple):
        for value in output:
            if isinstance(value, Tensor) and value.is_floating_point():
                return "tensor", value
    raise InvalidArgumentError(f"cannot find a tensor to distil in a {type(output).__name__}")


def _is_classifier(model: nn.Module, kind: str) -> bool:
    if kind == "logits":
        return True
    return kind == "tensor" and getattr(model, "num_classes", 0) > 0  # timm classifiers


def _embedding(kind: str, out: Tensor, mask: Tensor | None) -> Tensor:
    """One vector per example: mean over tokens (masked) for hidden states."""
    if kind == "last_hidden_state" and out.dim() == 3:
        if mask is None:
            return out.mean(1)
        weights = mask.unsqueeze(-1).to(out.dtype)
        return (out * weights).sum(1) / weights.sum(1).clamp_min(1)
    return out.flatten(1)


# Losses ----------------------------------------------------------------------------------------


def _output_loss(kind: str, student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    if kind == "kl":
        t = temperature
        return F.kl_div(
            F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
            reduction="batchmean",
        ) * (t * t)  # fmt: skip
    flat_s, flat_t = student.flatten(1).float(), teacher.flatten(1).float()
    mse = F.mse_loss(flat_s, flat_t) / flat_t.var().clamp_min(1e-8)
    cosine = 1 - F.cosine_similarity(flat_s, flat_t, dim=-1).mean()
    return mse + cosine


class _LayerTaps:
    """Forward hooks that record the outputs of the same named modules in two models."""

    def __init__(self, names: list[str], student: nn.Module, teacher: nn.Module) -> None:
        self.outputs: dict[str, dict[str, Tensor]] = {"student": {}, "teacher": {}}
        self.handles = []
        for role, model in (("student", student), ("teacher", teacher)):
            modules = dict(model.named_modules())
            for name in names:
                self.handles.append(modules[name].register_forward_hook(self._hook(role, name)))

    def _hook(self, role: str, name: str):
        def record(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, Tensor):
                self.outputs[role][name] = output

        return record

    def loss(self) -> Tensor | None:
        terms = []
        for name, student_out in self.outputs["student"].items():
            teacher_out = self.outputs["teacher"].get(name)
            if teacher_out is not None and teacher_out.shape == student_out.shape:
                scale = teacher_out.float().var().clamp_min(1e-8)
                terms.append(F.mse_loss(student_out.float(), teacher_out.float()) / scale)
        self.outputs = {"student": {}, "teacher": {}}
        return torch.stack(terms).mean() if terms else None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def converted_parents(model: nn.Module) -> list[str]:
    """Names of the modules that hold a converted activation: the layers to match."""
    refs, order = _walk(model)
    names: list[str] = []
    for _, module in order:
        if isinstance(module, Serf) and _ORIGINAL_ATTR in module.__dict__:
            for ref in refs[id(module)]:
                parent = ref.name.rpartition(".")[0]
                if ref.parent is not None and parent not in names:
                    names.append(parent)
    return names


# Blend ramp ------------------------------------------------------------------------------------


class _Blend(nn.Module):
    """``alpha * serf(x) + (1 - alpha) * original(x)`` during the first part of recovery."""

    def __init__(self, serf: Serf, original: nn.Module) -> None:
        super().__init__()
        self.serf = serf
        self.__dict__["original"] = original  # not a submodule: no parameters to train
        self.alpha = 0.0

    def forward(self, x: Tensor) -> Tensor:
        if self.alpha >= 1.0:
            return self.serf(x)
        # An in-place original (ReLU(inplace=True)) must not overwrite what Serf reads.
        source = x.clone() if getattr(self.original, "inplace", False) else x
        return self.alpha * self.serf(x) + (1 - self.alpha) * self.original(source)


def _swap_blends(model: nn.Module, install: bool) -> list[_Blend]:
    refs, order = _walk(model)
    blends: dict[int, _Blend] = {}
    for _, module in order:
        if install and isinstance(module, Serf) and _ORIGINAL_ATTR in module.__dict__:
            blend = blends.setdefault(id(module), _Blend(module, module.__dict__[_ORIGINAL_ATTR]))
        elif not install and isinstance(module, _Blend):
            blend = module
        else:
            continue
        for ref in refs[id(module)]:
            if ref.parent is not None:
                ref.parent._modules[ref.key] = blend if install else blend.serf
    return list(blends.values())


# BatchNorm -------------------------------------------------------------------------------------


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: Iterable[Any], device: torch.device) -> int:
    """Recompute BatchNorm running statistics of ``model`` on ``batches`` (cumulative average)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    saved = [(m, m.momentum, m.training) for m in norms]
    was_training = model.training
    model.train()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    seen = 0
    for batch in batches:
        args, kwargs, _ = _split(_to(batch, device))
        model(*args, **kwargs)
        seen += 1
    for m, momentum, training in saved:
        m.momentum = momentum
        m.train(training)
    model.train(was_training)
    return seen


# Evaluation ------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(student: nn.Module, teacher: nn.Module, batches: Iterable[Any], device: torch.device,
             *, temperature: float = 1.0) -> dict[str, float]:  # fmt: skip
    """Agreement with the teacher on held-out batches.

    ``agreement``: top-1 agreement for classifiers, nearest-neighbour agreement for embeddings
    (each example's nearest other example, by cosine, is the same for both models);
    ``cosine``: mean cosine of outputs; ``kl`` for classifiers; ``accuracy`` when labelled.
    """
    student_mode = student.training
    student.eval()
    sums: dict[str, float] = {}
    count = 0
    for batch in batches:
        args, kwargs, labels = _split(_to(batch, device))
        kind, s_out = _primary(student(*args, **kwargs))
        _, t_out = _primary(teacher(*args, **kwargs))
        n = s_out.shape[0]
        metrics: dict[str, float] = {}
        if _is_classifier(teacher, kind):
            metrics["agreement"] = (s_out.argmax(-1) == t_out.argmax(-1)).float().mean().item()
            metrics["kl"] = _output_loss("kl", s_out, t_out, temperature).item()
            if labels is not None:
                metrics["accuracy"] = (s_out.argmax(-1) == labels).float().mean().item()
        else:
            mask = kwargs.get("attention_mask")
            s_emb, t_emb = _embedding(kind, s_out, mask), _embedding(kind, t_out, mask)
            if n > 1:
                metrics["agreement"] = (
                    (_neighbours(s_emb) == _neighbours(t_emb)).float().mean().item()
                )
        s_flat, t_flat = s_out.flatten(1).float(), t_out.flatten(1).float()
        metrics["cosine"] = F.cosine_similarity(s_flat, t_flat, dim=-1).mean().item()
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + value * n
        count += n
    student.train(student_mode)
    return {k: v / count for k, v in sums.items()} if count else {}


def _neighbours(emb: Tensor) -> Tensor:
    unit = F.normalize(emb.float(), dim=-1)
    sim = unit @ unit.T
    sim.fill_diagonal_(-2.0)
    return sim.argmax(-1)


# The loop --------------------------------------------------------------------------------------


@dataclass
class RecoveryResult:
    """What :func:`recover` did: the loss history and the metrics before and after."""

    steps: int
    seconds: float
    before: dict[str, float]
    after: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)

    def __str__(self) -> str:
        keys = sorted(set(self.before) | set(self.after))
        lines = [f"serfswap recovery: {self.steps} steps in {self.seconds:.1f} s"]
        lines.append(f"  {'metric':<10} {'before':>9} {'after':>9}")
        for key in keys:
            b, a = self.before.get(key, math.nan), self.after.get(key, math.nan)
            lines.append(f"  {key:<10} {b:>9.4f} {a:>9.4f}")
        return "\n".join(lines)


@dataclass(frozen=True)
class RecoveryOptions:
    """The knobs of :func:`recover` (documented there), checked when made."""

    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: float = 0.1
    clip: float = 1.0
    output_loss: str = "auto"
    temperature: float = 2.0
    output_weight: float = 1.0
    layer_weight: float = 1.0
    task_weight: float = 1.0
    blend: float = 0.0
    bn_batches: int = 0

    def __post_init__(self) -> None:
        if self.output_loss not in OUTPUT_LOSSES:
            raise InvalidArgumentError(
                f"output_loss={self.output_loss!r}: use one of {OUTPUT_LOSSES}"
            )
        for name in ("warmup", "blend"):
            if not 0 <= getattr(self, name) <= 1:
                raise InvalidArgumentError(f"{name}={getattr(self, name)}: a fraction of steps")
        if self.lr <= 0 or self.temperature <= 0 or self.clip <= 0:
            raise InvalidArgumentError("lr, temperature and clip must be positive")
        if self.bn_batches < 0:
            raise InvalidArgumentError(f"bn_batches={self.bn_batches}: must be >= 0")


def _cycle(data: Iterable[Any]) -> Iterator[Any]:
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise InvalidArgumentError("data yielded no batch")


def _schedule(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def recover(
    student: nn.Module,
    teacher: nn.Module,
    data: Iterable[Any],
    *,
    steps: int,
    lr: float = 1e-4,
    weight_decay: float = 0.01,
    warmup: float = 0.1,
    clip: float = 1.0,
    output_loss: str = "auto",
    temperature: float = 2.0,
    output_weight: float = 1.0,
    layer_weight: float = 1.0,
    task_weight: float = 1.0,
    blend: float = 0.0,
    bn_batches: int = 0,
    eval_data: Iterable[Any] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> RecoveryResult:
    """Fine-tune ``student`` (a converted model) towards ``teacher`` (the original) in place.

    Args:
        data: an iterable of batches (a tensor, ``(inputs, labels)``, or a dict of tensors for
            ``model(**batch)``); re-iterated when exhausted.
        steps: optimiser steps.
        warmup: fraction of ``steps`` of linear warmup before the cosine decay.
        output_loss: ``"kl"`` (logits), ``"mse-cosine"`` (embeddings), or ``"auto"``.
        layer_weight: weight of matching the outputs of modules that hold converted activations
            (0 turns it off).
        blend: fraction of ``steps`` over which converted modules ramp from the original
            activation to Serf (0: off).
        bn_batches: batches used to re-estimate BatchNorm statistics first (0: off).
        eval_data: held-out batches; the result reports metrics on them before and after.
    """
    if steps < 1:
        raise InvalidArgumentError(f"steps={steps}: need at least one step")
    opts = RecoveryOptions(
        lr=lr,
        weight_decay=weight_decay,
        warmup=warmup,
        clip=clip,
        output_loss=output_loss,
        temperature=temperature,
        output_weight=output_weight,
        layer_weight=layer_weight,
        task_weight=task_weight,
        blend=blend,
        bn_batches=bn_batches,
    )
    torch.manual_seed(seed)
    device = next(student.parameters()).device
    with eval_mode(teacher):  # the caller's teacher keeps its modes; no_grad keeps it frozen
        return _recover(student, teacher, data, steps, device, opts, eval_data, progress)


def _recover(
    student: nn.Module,
    teacher: nn.Module,
    data: Iterable[Any],
    steps: int,
    device: torch.device,
    opts: RecoveryOptions,
    eval_data: Iterable[Any] | None,
    progress: bool,
) -> RecoveryResult:
    """The loop of :func:`recover`."""
    start = time.perf_counter()
    eval_batches = list(eval_data) if eval_data is not None else []
    before = evaluate(student, teacher, eval_batches, device) if eval_batches else {}

    if opts.bn_batches:
        reestimate_batchnorm(student, _take(_cycle(data), opts.bn_batches), device)
    blends = _swap_blends(student, install=True) if opts.blend > 0 else []
    taps = _LayerTaps(converted_parents(student), student, teacher) if opts.layer_weight else None
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    warm = max(1, int(opts.warmup * steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, steps, warm))
    ramp = max(1, int(opts.blend * steps))
    history: list[dict[str, float]] = []
    bar = _progress(steps, progress)
    student.train()
    try:
        for step, batch in zip(range(steps), _cycle(data), strict=False):
            for b in blends:
                b.alpha = min(1.0, (step + 1) / ramp)
            args, kwargs, labels = _split(_to(batch, device))
            with torch.no_grad():
                kind, t_out = _primary(teacher(*args, **kwargs))
            _, s_out = _primary(student(*args, **kwargs))
            mode = opts.output_loss
            if mode == "auto":
                mode = "kl" if _is_classifier(teacher, kind) else "mse-cosine"
            loss = opts.output_weight * _output_loss(mode, s_out, t_out, opts.temperature)
            record = {"step": step + 1, "output": loss.item()}
            if taps is not None:
                layer = taps.loss()
                if layer is not None:
                    loss = loss + opts.layer_weight * layer
                    record["layer"] = layer.item()
            if labels is not None and mode == "kl":
                task = F.cross_entropy(s_out, labels)
                loss = loss + opts.task_weight * task
                record["task"] = task.item()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, opts.clip)
            optimizer.step()
            scheduler.step()
            record.update(loss=loss.item(), lr=scheduler.get_last_lr()[0])
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            bar.update(1)
    finally:
        bar.close()
        if taps is not None:
            taps.remove()
        if blends:
            _swap_blends(student, install=False)
    after = evaluate(student, teacher, eval_batches, device) if eval_batches else {}
    return RecoveryResult(steps, time.perf_counter() - start, before, after, history)


def _take(batches: Iterator[Any], n: int) -> Iterator[Any]:
    for _, batch in zip(range(n), batches, strict=False):
        yield batch


class _NoBar:
    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(steps: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: run without a bar
        return _NoBar()
    return tqdm(total=steps, desc="recover", unit="step")
