"""What recovery compares: batches, model outputs, the distillation losses, the layer taps, the
blend ramp, BatchNorm re-estimation and the held-out evaluation.

Kept apart from the training loop (``recover.py``) so that each piece can be read, and tested,
on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InvalidArgumentError
from ..modes import eval_mode, modes
from ..ops.serf import Serf
from ..rewrite.walk import converted_serfs, original_of, put, walk
from .lm import input_ids_of, is_causal_lm, lm_metrics, lm_sums, token_kl

# Batches -------------------------------------------------------------------------------------


def split_batch(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any], Tensor | None]:
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


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` (tensors nested in dicts, tuples and lists) on ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


# Outputs -------------------------------------------------------------------------------------


def outputs(output: Any) -> dict[str, Tensor]:
    """The outputs to distil, by kind.

    ``logits`` when the model has them; otherwise ``last_hidden_state`` (the tokens sentence
    embeddings are pooled from) plus ``pooler_output`` when present; for plain tensors and
    tuples, the first floating-point tensor as ``tensor``.
    """
    if isinstance(output, Tensor):
        return {"tensor": output}
    if isinstance(output, dict):
        found = {k: output.get(k) for k in ("logits", "last_hidden_state", "pooler_output")}
        found = {k: v for k, v in found.items() if isinstance(v, Tensor)}
        if "logits" in found:
            return {"logits": found["logits"]}
        if found:
            return found
        output = tuple(output.values())
    if isinstance(output, list | tuple):
        for value in output:
            if isinstance(value, Tensor) and value.is_floating_point():
                return {"tensor": value}
    raise InvalidArgumentError(f"cannot find a tensor to distil in a {type(output).__name__}")


def is_classifier(model: nn.Module, outs: dict[str, Tensor]) -> bool:
    """Logits, or a timm classifier's output tensor: distilled with KL, judged by top-1."""
    if "logits" in outs:
        return True
    return "tensor" in outs and getattr(model, "num_classes", 0) > 0


def task_kind(model: nn.Module, outs: dict[str, Tensor]) -> str:
    """What ``model`` (the teacher) is to recovery, from the model and its ``outs``:
    ``"causal-lm"`` (:func:`~serfswap.recovery.lm.is_causal_lm`, with logits), distilled with
    KL per real token and judged by perplexity and next-token agreement; ``"classifier"``
    (:func:`is_classifier`), KL and top-1; ``"embedding"`` for the rest, MSE plus cosine and
    nearest-neighbour agreement."""
    if "logits" in outs and is_causal_lm(model):
        return "causal-lm"
    return "classifier" if is_classifier(model, outs) else "embedding"


def embedding(outs: dict[str, Tensor], mask: Tensor | None) -> Tensor:
    """One vector per example: the masked mean of the tokens for hidden states (how
    sentence-transformers pools), the flattened output otherwise."""
    hidden = outs.get("last_hidden_state")
    if hidden is not None and hidden.dim() == 3:
        if mask is None:
            return hidden.mean(1)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)
    return next(iter(outs.values())).flatten(1)


# Losses --------------------------------------------------------------------------------------


def kl_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Hinton's KL with temperature, scaled by T^2 so that its gradients keep their size."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student.float() / t, -1), F.log_softmax(teacher.float() / t, -1),
        log_target=True, reduction="batchmean",
    ) * (t * t)  # fmt: skip


def _mse_cosine(student: Tensor, teacher: Tensor) -> Tensor:
    """Rows of ``student`` towards rows of ``teacher``: MSE over the teacher's variance (scale
    free) plus one minus the mean cosine (direction, which is what embeddings are used by)."""
    s, t = student.float(), teacher.float()
    mse = F.mse_loss(s, t) / _variance(t).clamp_min(1e-8)
    return mse + 1 - F.cosine_similarity(s, t, dim=-1).mean()


def embedding_loss(
    student: dict[str, Tensor], teacher: dict[str, Tensor], mask: Tensor | None
) -> Tensor:
    """MSE plus cosine on every output: per real token for hidden states (padding left out),
    plus the pooled sentence embedding; per example for everything else."""
    terms = []
    for key, t_out in teacher.items():
        s_out = student[key]
        if key == "last_hidden_state" and t_out.dim() == 3:
            keep = mask.bool() if mask is not None else torch.ones(t_out.shape[:2], dtype=bool)
            keep = keep.to(t_out.device)
            terms.append(_mse_cosine(s_out[keep], t_out[keep]))
            pooled = {"last_hidden_state": s_out}, {"last_hidden_state": t_out}
            terms.append(_mse_cosine(embedding(pooled[0], mask), embedding(pooled[1], mask)))
        else:
            terms.append(_mse_cosine(s_out.flatten(1), t_out.flatten(1)))
    return torch.stack(terms).sum()


def loss_kind(output_loss: str, teacher: nn.Module, teacher_out: dict[str, Tensor]) -> str:
    """``"kl"`` or ``"mse-cosine"``: ``output_loss`` unless ``"auto"``, then KL for logits (a
    classifier's or a causal LM's, see :func:`task_kind`) and MSE plus cosine for anything
    else. Chosen once per run."""
    if output_loss != "auto":
        return output_loss
    return "mse-cosine" if task_kind(teacher, teacher_out) == "embedding" else "kl"


def distillation_loss(
    student_out: dict[str, Tensor],
    teacher_out: dict[str, Tensor],
    *,
    kind: str,
    temperature: float = 2.0,
    mask: Tensor | None = None,
    layer: Tensor | None = None,
    labels: Tensor | None = None,
    output_weight: float = 1.0,
    layer_weight: float = 1.0,
    task_weight: float = 1.0,
) -> tuple[Tensor, dict[str, float]]:
    """The loss of one step and its parts: ``output`` (``kind`` ``"kl"`` on the first output,
    with ``temperature``, per real token by ``mask`` for per-token logits such as a causal
    LM's; ``"mse-cosine"`` on every output, per real token by ``mask``) times
    ``output_weight``, plus ``layer_weight`` times ``layer`` (the matched layers' loss, from
    :class:`LayerTaps`) and, for KL with ``labels``, ``task_weight`` times cross-entropy.

    Returns the loss to back-propagate and the weighted parts as floats (the run's record)."""
    if kind == "kl":
        s_out, t_out = next(iter(student_out.values())), next(iter(teacher_out.values()))
        if t_out.dim() == 3:  # [batch, positions, vocab]: a distribution per token
            loss = token_kl(s_out, t_out, temperature, mask)
        else:
            loss = kl_loss(s_out, t_out, temperature)
    else:
        loss = embedding_loss(student_out, teacher_out, mask)
    loss = output_weight * loss
    record = {"output": loss.item()}
    if layer is not None:
        loss = loss + layer_weight * layer
        record["layer"] = layer.item()
    if labels is not None and kind == "kl":
        task = F.cross_entropy(next(iter(student_out.values())).float(), labels)
        loss = loss + task_weight * task
        record["task"] = task.item()
    return loss, record


class LayerTaps:
    """Forward hooks that record the outputs of the same named modules in two models, for
    matching the layers whose activations were converted."""

    def __init__(self, names: list[str], student: nn.Module, teacher: nn.Module,
                 scales: dict[str, float | list[float]] | None = None) -> None:  # fmt: skip
        """``scales``: by name, what the student's output is multiplied by before it is
        compared (a Serf fitted to its original activation whose output scale went into a
        later layer: see :func:`serfswap.recovery.fit.holder_scales`)."""
        self.outputs: dict[str, dict[str, Tensor]] = {"student": {}, "teacher": {}}
        self.scales = scales or {}
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
        """Mean over tapped layers of MSE over the teacher's variance; clears the records."""
        terms = []
        for name, student_out in self.outputs["student"].items():
            teacher_out = self.outputs["teacher"].get(name)
            if teacher_out is not None and teacher_out.shape == student_out.shape:
                scale = _variance(teacher_out.detach().float()).clamp_min(1e-8)
                student_out = student_out.float()
                if name in self.scales:  # a float, or one per channel of the last dimension
                    factor = torch.as_tensor(self.scales[name], device=student_out.device)
                    student_out = student_out * factor
                terms.append(F.mse_loss(student_out, teacher_out.float()) / scale)
        self.outputs = {"student": {}, "teacher": {}}
        return torch.stack(terms).mean() if terms else None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _variance(t: Tensor) -> Tensor:
    """The variance of ``t`` over the whole global batch: under torchrun each rank holds a
    slice, and the ranks' sums and sums of squares are added up, so that every rank scales its
    MSE terms (layer matching, hidden states) alike and the ranks together follow the
    single-process run."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t.var()
    t = t.double()
    stats = torch.stack([t.sum(), (t * t).sum(), t.new_tensor(t.numel())])
    dist.all_reduce(stats)
    total, squares, n = stats.unbind()
    return ((squares - total * total / n) / (n - 1)).float()


def converted_parents(model: nn.Module) -> list[str]:
    """Names of the modules that hold a converted activation: the layers to match."""
    names: list[str] = []
    for _, refs in converted_serfs(model):
        for ref in refs:
            parent = ref.name.rpartition(".")[0]
            if ref.parent is not None and parent not in names:
                names.append(parent)
    return names


# Blend ramp ----------------------------------------------------------------------------------


class Blend(nn.Module):
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


def swap_blends(model: nn.Module, install: bool) -> list[Blend]:
    """Put a :class:`Blend` in place of every converted Serf (``install``), or take them out."""
    if install:
        blends = []
        for serf, refs in converted_serfs(model):
            original = original_of(serf)
            assert original is not None  # converted_serfs lists converted ones only
            blends.append(Blend(serf, original))
            put(refs, blends[-1])  # the root is never blended: it has no parent to hold one
        return blends
    refs, order = walk(model)
    blends = [module for _, module in order if isinstance(module, Blend)]
    for blend in blends:
        put(refs[id(blend)], blend.serf)
    return blends


# BatchNorm -----------------------------------------------------------------------------------


@torch.no_grad()
def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def reestimate_batchnorm(model: nn.Module, batches: Iterable[Any], device: torch.device) -> int:
    """Recompute BatchNorm running statistics of ``model`` on ``batches`` (cumulative average)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta = [(m, m.momentum) for m in norms]
    seen = 0
    with modes(model, training=True):
        try:
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # a cumulative average over the batches, not a running one
            for batch in batches:
                args, kwargs, _ = split_batch(to_device(batch, device))
                model(*args, **kwargs)
                seen += 1
        finally:
            for m, momentum in momenta:
                m.momentum = momentum
    return seen


# Evaluation ----------------------------------------------------------------------------------


class TeacherOutputs:
    """The teacher's outputs on a run's held-out batches, kept from one evaluation to the next.

    The teacher is frozen and the held-out batches are the same all run, so once they are
    kept an evaluation runs the student only: half the forwards of each of a run's
    evaluations (before, after the fit, every ``eval_every`` steps, at the end, and the
    original against itself). Kept on the CPU up to ``budget`` bytes (a causal LM's logits are
    rows x tokens x vocabulary); a batch past it is run through the teacher each time. What is
    kept depends only on the batches, so every rank of a sharded run, evaluating the same
    batches, runs the same teacher forwards (collectives under FSDP).
    """

    def __init__(self, budget: int = 256 * 2**20) -> None:
        self.budget, self.used = budget, 0
        self.batches: object = None
        self.kept: dict[int, dict[str, Tensor]] = {}

    def get(self, batches: object, index: int, device: torch.device,
            compute: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:  # fmt: skip
        """Batch ``index`` of ``batches``' teacher outputs: kept, or ``compute()``-d (and kept
        while the budget allows). Another list of batches starts afresh."""
        if batches is not self.batches:
            self.batches, self.kept, self.used = batches, {}, 0
        if index in self.kept:
            return {k: v.to(device) for k, v in self.kept[index].items()}
        found = compute()
        size = sum(v.numel() * v.element_size() for v in found.values())
        if self.used + size <= self.budget:
            self.kept[index] = {k: v.detach().to("cpu", copy=True) for k, v in found.items()}
            self.used += size
        return found


def _teacher_outputs(teacher: nn.Module, cache: TeacherOutputs | None, batches: object,
                     index: int, device: torch.device, args: Any, kwargs: Any,
                     ) -> dict[str, Tensor]:  # fmt: skip
    def compute() -> dict[str, Tensor]:
        return outputs(teacher(*args, **kwargs))

    return compute() if cache is None else cache.get(batches, index, device, compute)


@torch.no_grad()
def evaluate(student: nn.Module, teacher: nn.Module, batches: Iterable[Any], device: torch.device,
             *, temperature: float = 1.0,
             cache: TeacherOutputs | None = None) -> dict[str, float]:  # fmt: skip
    """Agreement with the teacher on held-out batches (the teacher's outputs from ``cache``
    when given: :class:`TeacherOutputs`).

    ``agreement``: top-1 agreement for classifiers, nearest-neighbour agreement for embeddings
    (each example's nearest other example in the batch, by cosine, is the same for both
    models); ``cosine``: mean cosine of the outputs (of the pooled sentence embeddings for
    hidden states); ``kl`` for classifiers; ``accuracy`` when batches carry labels. For a
    causal LM (:func:`~serfswap.recovery.lm.is_causal_lm`) the figures its user judges it by,
    over real tokens: ``perplexity``, ``original_perplexity`` and their ``perplexity_ratio``,
    top-1 next-token ``agreement`` and ``kl`` (at T=1).
    """
    with eval_mode(student):
        if is_causal_lm(teacher):
            return _evaluate_lm(student, teacher, batches, device, cache)
        sums, count = _sum_metrics(student, teacher, batches, device, temperature, cache)
    return {k: v / count for k, v in sums.items()} if count else {}


def _evaluate_lm(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[Any],
    device: torch.device,
    cache: TeacherOutputs | None,
) -> dict[str, float]:
    """:func:`evaluate` for a causal LM: token counts summed over all batches, then the
    figures (a perplexity is of all held-out tokens, not a mean of per-batch ones)."""
    sums: dict[str, float] = {}
    for index, batch in enumerate(batches):
        args, kwargs, _ = split_batch(to_device(batch, device))
        s_out = outputs(student(*args, **kwargs))["logits"]
        t_out = _teacher_outputs(teacher, cache, batches, index, device, args, kwargs)["logits"]
        found = lm_sums(s_out, t_out, input_ids_of(args, kwargs), kwargs.get("attention_mask"))
        for key, value in found.items():
            sums[key] = sums.get(key, 0.0) + value
    return lm_metrics(sums)


def _sum_metrics(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[Any],
    device: torch.device,
    temperature: float,
    cache: TeacherOutputs | None,
) -> tuple[dict[str, float], int]:
    """The sums over examples of each metric of :func:`evaluate`, and the number of examples."""
    sums: dict[str, float] = {}
    count = 0
    for index, batch in enumerate(batches):
        args, kwargs, labels = split_batch(to_device(batch, device))
        s_outs = outputs(student(*args, **kwargs))
        t_outs = _teacher_outputs(teacher, cache, batches, index, device, args, kwargs)
        metrics: dict[str, float] = {}
        if is_classifier(teacher, t_outs):
            s_out, t_out = next(iter(s_outs.values())), next(iter(t_outs.values()))
            metrics["agreement"] = (s_out.argmax(-1) == t_out.argmax(-1)).float().mean().item()
            metrics["kl"] = kl_loss(s_out, t_out, temperature).item()
            if labels is not None:
                metrics["accuracy"] = (s_out.argmax(-1) == labels).float().mean().item()
            s_emb, t_emb = s_out.flatten(1), t_out.flatten(1)
        else:
            mask = kwargs.get("attention_mask")
            s_emb, t_emb = embedding(s_outs, mask), embedding(t_outs, mask)
            if s_emb.shape[0] > 1:
                agree = _neighbours(s_emb) == _neighbours(t_emb)
                metrics["agreement"] = agree.float().mean().item()
        metrics["cosine"] = F.cosine_similarity(s_emb.float(), t_emb.float(), -1).mean().item()
        n = s_emb.shape[0]
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + value * n
        count += n
    return sums, count


def _neighbours(emb: Tensor) -> Tensor:
    unit = F.normalize(emb.float(), dim=-1)
    sim = unit @ unit.T
    sim.fill_diagonal_(-2.0)
    return sim.argmax(-1)
