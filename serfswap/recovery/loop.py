"""recover(): a short fine-tune, taught by the original model, that gives back what the swap took.

The teacher is the original model, frozen and in eval mode; no labels are needed. The student
learns to reproduce the teacher's outputs (KL with temperature on logits, per real token for a
causal LM's, see ``lm.py``; MSE plus cosine on hidden states, per real token and pooled, and on
other outputs) and, with ``layer_weight``, the outputs of the modules whose activations were
converted (forward hooks on both models, normalised by the teacher's variance).
Batches that carry labels add the task loss. AdamW,
linear warmup then cosine decay, gradient clipping. The pieces it compares live in
``distill.py``; checkpoints and the run state they hold in ``state.py``; the learning-rate and
blend schedule in ``schedule.py``; ``torchrun`` support in ``distributed.py``, and sharding
(``fsdp=True``) with its checkpoints in ``fsdp.py``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InvalidArgumentError
from ..modes import eval_mode, modes
from ..options import (  # noqa: F401 (the choices are re-exported)
    AUTOCAST_CHOICES,
    DEFAULT_LR,
    LR_BY_KIND,
    OUTPUT_LOSSES,
    TRAIN_CHOICES,
    RecoveryOptions,
)
from . import distributed, fit, fsdp, measures, relational
from . import log as curves
from . import state as trainstate
from .distill import (
    LayerTaps,
    TeacherOutputs,
    converted_parents,
    distillation_loss,
    evaluate,
    has_batchnorm,
    loss_kind,
    outputs,
    reestimate_batchnorm,
    split_batch,
    swap_blends,
    task_kind,
    to_device,
)
from .schedule import Schedule
from .stream import Seekable

logger = logging.getLogger(__name__)


@dataclass
class RecoveryResult:
    """What :func:`recover` did: the metrics before and after, the per-step history, the
    held-out evaluations along the way, and where it resumed from and checkpointed to."""

    steps: int
    seconds: float
    before: dict[str, float]
    after: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int | None = None
    checkpoint: Path | None = None
    # Bytes this process held at the end of the last step, of the trainable parameters, their
    # gradients and the optimizer's state: its shards under FSDP (see fsdp.local_bytes).
    local_bytes: dict[str, int] = field(default_factory=dict)
    # The original (the teacher) evaluated against itself on the same held-out batches: the
    # ceiling the figures are read against (agreement 1, cosine 1, its own accuracy).
    original: dict[str, float] = field(default_factory=dict)
    # The examples of the largest held-out batch: the pool nearest neighbours are searched in.
    pool: int = 0
    # The held-out metrics after each Serf was fitted to its original activation (fit.py),
    # before the first step; empty when there was no fit or no held-out data.
    fitted: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        keys = sorted(set(self.before) | set(self.after))
        resumed = f", resumed at step {self.resumed_from}" if self.resumed_from else ""
        lines = [f"serfswap recovery: {self.steps} steps in {self.seconds:.1f} s{resumed}"]
        width = max([10, *map(len, keys)])
        lines.append(f"  {'metric':<{width}} {'before':>9} {'after':>9} {'original':>9}")
        for key in keys:
            b, a = self.before.get(key, math.nan), self.after.get(key, math.nan)
            o = self.original.get(key, math.nan)
            lines.append(f"  {key:<{width}} {b:>9.4f} {a:>9.4f} {o:>9.4f}")
        lines += ["  " + line for line in measures.headline(self.before, self.after,
                                                            self.original, self.pool)]  # fmt: skip
        return "\n".join(lines)


def recover(
    student: nn.Module,
    teacher: nn.Module,
    data: Iterable[Any],
    *,
    steps: int,
    eval_data: Iterable[Any] | None = None,
    options: RecoveryOptions | None = None,
    **overrides: Any,
) -> RecoveryResult:
    """Fine-tune ``student`` (a converted model) towards ``teacher`` (the original) in place.

    Args:
        data: an iterable of batches (a tensor, ``(inputs, labels)``, or a dict of tensors for
            ``model(**batch)``), re-iterated when exhausted. Under ``torchrun`` each batch is a
            global batch: every rank takes its slice of it.
        steps: optimiser steps.
        eval_data: held-out batches; the result reports agreement with the teacher on them
            before and after (and every ``eval_every`` steps).
        options: a :class:`RecoveryOptions` (default: its defaults), as torchao takes a
            config object; checked when made, so it can be built before any data is read.
        overrides: options as keywords, over ``options`` (``lr=1e-4``, ``layer_weight=1.0``,
            ``checkpoint_dir=...``, ``resume=True``, ``log=...``, ``plot=...``...).

    A resumed run (``resume=True``) ends with the same weights as an uninterrupted one when
    ``data``, built afresh in each process, yields the same sequence of passes (a list, or a
    DataLoader with a seeded generator, which reshuffles on each pass): the run draws all its
    batches, BatchNorm re-estimation's first, from one stream over ``data``, and a resumed run
    skips the batches the finished part drew.

    Finished runs: with ``resume=True`` and more ``steps`` than a finished run in
    ``checkpoint_dir`` had, the run is extended: the added steps get their own warmup and
    cosine decay to 0, peaking at ``lr`` (a warm restart; the finished run's rate has decayed
    to 0), while the weights, AdamW moments, RNG states and data position carry on. Without
    ``resume``, a finished run in ``checkpoint_dir`` is replaced by the new one; an unfinished
    one is refused.

    With ``fsdp=True`` under ``torchrun`` the student and the teacher are sharded in place and
    stay so, with the process group (see :mod:`serfswap.recovery.fsdp`): write the student
    with ``fsdp.save_consolidated(student, path)`` on every rank, then destroy the group.
    """
    if steps < 1:
        raise InvalidArgumentError(f"steps={steps}: need at least one step")
    known = {f.name for f in fields(RecoveryOptions)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise InvalidArgumentError(f"unknown option(s) {unknown}; known: {sorted(known)}")
    if options is not None and not isinstance(options, RecoveryOptions):
        raise InvalidArgumentError(f"options= takes a RecoveryOptions, got {options!r:.80}")
    opts = replace(options, **overrides) if options is not None else RecoveryOptions(**overrides)
    if opts.plot is not None:
        curves.require_matplotlib()
    device = next(student.parameters()).device
    world = distributed.join(device)
    sharded = False
    try:
        with eval_mode(teacher), _frozen(student, opts), fsdp.teacher_precision(teacher, opts):
            run = _Run(student, teacher, data, steps, device, opts, world)
            sharded = run.trainer.sharded
            return run.run(eval_data)
    finally:
        if not sharded:  # the shards live on the group: the caller gathers them, then leaves
            distributed.leave(world)


@contextlib.contextmanager
def _frozen(student: nn.Module, opts: RecoveryOptions) -> Iterator[None]:
    """With ``train="converted"``, every parameter outside the converted modules frozen, for
    the run only: the student gets its ``requires_grad`` flags and its modes back after."""
    # By name, not by holding the parameters: FSDP replaces them by their shards, and a list
    # of them would keep the whole unsharded student alive on every rank for the run.
    saved = {name: p.requires_grad for name, p in student.named_parameters()}
    if opts.train == "converted":
        keep = {id(p) for name in converted_parents(student)
                for p in student.get_submodule(name).parameters()}  # fmt: skip
        for p in student.parameters():
            p.requires_grad_(p.requires_grad and id(p) in keep)
    try:
        with modes(student):
            yield
    finally:
        for name, p in student.named_parameters():
            p.requires_grad_(saved[name])


class _Trainer:
    """The optimisation of one run: the trainable parameters, AdamW and the schedule, and one
    distillation step of the student towards the teacher."""

    def __init__(self, student: nn.Module, teacher: nn.Module, steps: int, device: torch.device,
                 opts: RecoveryOptions, world: distributed.World) -> None:  # fmt: skip
        self.student, self.teacher, self.device, self.opts, self.world = (
            student, teacher, device, opts, world)  # fmt: skip
        # Under FSDP the parameters are replaced by their shards: sharded before the optimizer
        # is made, so that it holds (and its moments are) the shards.
        self.sharded = fsdp.shard_run(student, teacher, world, device, opts)
        self.params = [p for p in student.parameters() if p.requires_grad]
        # The teacher's outputs on the held-out batches, computed at the first evaluation.
        self.teacher_outputs = TeacherOutputs()
        if not self.params:
            raise InvalidArgumentError("the student has no trainable parameter")
        # Without an ``lr``, the default one until the first step knows the kind of model.
        lr = opts.lr if opts.lr is not None else DEFAULT_LR
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=opts.weight_decay)
        self.schedule = Schedule(self.optimizer, steps, warmup=opts.warmup, blend=opts.blend)
        self.loss_kind: str | None = None  # "kl" or "mse-cosine", chosen at the first step

    def snapshot(
        self, state: trainstate.RunState, rngs: list[dict[str, Any]]
    ) -> trainstate.RunState:
        """``state`` with the optimizer's, the schedule's and the RNGs' states: a checkpoint."""
        scheduler, segments = self.schedule.state()
        # An FSDP run's optimizer state is in its shards (fsdp.save_shards), not in state.pt:
        # at one process too, so that a run of any size resumes from it.
        optimizer = {} if self.opts.fsdp else self.optimizer.state_dict()
        return replace(state, optimizer=optimizer, scheduler=scheduler, segments=segments,
                       rng=rngs)  # fmt: skip

    def restore(self, state: trainstate.RunState, path: Path) -> None:
        """Back to where the checkpoint ``state`` (at ``path``) stood: this process's RNG state
        included; the weights too when the checkpoint is sharded (written by an FSDP run, at
        any number of ranks). At another number of ranks than the checkpoint's N, rank r takes
        rank r mod N's RNG state: every rank starts from one seed and draws alike, so the
        states are the same (see docs/scaling.md)."""
        if trainstate.sharded(path):
            fsdp.load_shards(path, self.student, self.optimizer)
        else:
            self.optimizer.load_state_dict(state.optimizer)
        self.schedule.restore(state.scheduler, state.segments)
        trainstate.set_rng_state(state.rng[self.world.rank % len(state.rng)])

    def wrap(self) -> nn.Module:
        """The student, or under torchrun the student in DistributedDataParallel (or the
        student itself when it is sharded)."""
        if self.world.size == 1 or self.sharded:
            return self.student
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # Some outputs leave parameters unused (a pooler when hidden states are distilled).
        return DistributedDataParallel(self.student, device_ids=ids, find_unused_parameters=True)

    def step(self, model: nn.Module, taps: LayerTaps | None, batch: Any) -> dict[str, Any]:
        """One optimiser step on this process's slice of ``batch``; the step's losses."""
        opts = self.opts
        batch = distributed.shard(batch, self.world)
        args, kwargs, labels = split_batch(to_device(batch, self.device))
        autocast = torch.autocast(self.device.type, torch.bfloat16, enabled=opts.autocast == "bf16")
        with autocast:
            with torch.no_grad():
                t_outs = outputs(self.teacher(*args, **kwargs))
            s_outs = outputs(model(*args, **kwargs))
        if self.loss_kind is None:
            self.loss_kind = loss_kind(opts.output_loss, self.teacher, t_outs)
            if opts.lr is None:  # the kind's default rate (a resumed run's is the same)
                self.schedule.set_peak(LR_BY_KIND.get(task_kind(self.teacher, t_outs), DEFAULT_LR))
        loss, parts = distillation_loss(
            s_outs, t_outs, kind=self.loss_kind, temperature=opts.temperature,
            mask=kwargs.get("attention_mask"), layer=taps.loss() if taps is not None else None,
            labels=labels, output_weight=opts.output_weight, layer_weight=opts.layer_weight,
            task_weight=opts.task_weight,
        )  # fmt: skip
        if self.loss_kind == "mse-cosine" and opts.relational_weight:  # embeddings: rankings
            loss, parts = relational.add_relational(
                loss, parts, s_outs, t_outs, kwargs.get("attention_mask"),
                weight=opts.relational_weight, temperature=opts.relational_temperature,
            )  # fmt: skip
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, opts.clip)
        self.optimizer.step()
        self.schedule.step()
        return {**parts, "loss": loss.item(), "lr": self.schedule.last_lr()}

    def evaluate(self, batches: list[Any], model: nn.Module | None = None) -> dict[str, float]:
        """Agreement of ``model`` (the student by default) with the teacher on held-out
        ``batches``, the teacher's outputs kept between the run's evaluations."""
        return evaluate(model or self.student, self.teacher, batches, self.device,
                        cache=self.teacher_outputs)  # fmt: skip


class _Run:
    """One recovery run: the set-up (:func:`_prepare`), the loop, checkpoints and the record
    (:attr:`state`, what a checkpoint holds besides the optimisation's own state)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, data: Iterable[Any], steps: int,
                 device: torch.device, opts: RecoveryOptions,
                 world: distributed.World) -> None:  # fmt: skip
        self.data, self.steps, self.device, self.opts, self.world = data, steps, device, opts, world
        self.folder = Path(opts.checkpoint_dir) if opts.checkpoint_dir is not None else None
        self.trainer = _Trainer(student, teacher, steps, device, opts, world)
        self.state = trainstate.RunState(steps)
        self.last_checkpoint: Path | None = None

    def say(self, message: str) -> None:
        """What the run is doing, for the slow parts that show no progress bar (logging, at
        INFO, on the main process; ``serfswap recover`` prints these lines)."""
        if self.world.main:
            logger.info(message)

    def run(self, eval_data: Iterable[Any] | None) -> RecoveryResult:
        """Set up (resume or start), train to the last step, evaluate, plot; the result."""
        start = time.perf_counter()
        eval_batches = list(eval_data) if eval_data is not None else []
        # One stream of batches for the whole run: BatchNorm re-estimation draws the first
        # ones, then each step the next (see _prepare).
        batches = _cycle(self.data)
        resumed = _prepare(self, batches, eval_batches)
        self._loop(batches, eval_batches)
        held = fsdp.local_bytes(self.trainer.params, self.trainer.optimizer)
        after = self.trainer.evaluate(eval_batches) if eval_batches else {}
        # The original against itself: its agreement is 1 by definition, its accuracy is not.
        original = self.trainer.evaluate(eval_batches, self.trainer.teacher) if eval_batches else {}
        state = self.state
        if self.opts.plot is not None and self.world.main:
            evals = [{"step": 0, **state.before}, *state.evals] if state.evals else []
            curves.plot(state.history, evals, Path(self.opts.plot))
        return RecoveryResult(self.steps, time.perf_counter() - start, state.before, after,
                              state.history, state.evals, resumed,
                              self.last_checkpoint, held, original,
                              measures.pool_size(eval_batches), state.fitted)  # fmt: skip

    def _loop(self, batches: Iterator[Any], eval_batches: list[Any]) -> None:
        """The steps, with the blend ramp, the layer taps, the log and the progress bar, all
        taken down after (on an error too)."""
        opts, state, student = self.opts, self.state, self.trainer.student
        main = self.world.main
        log = None
        if opts.log is not None and main:
            log = curves.JsonLog(Path(opts.log), state.history)
        bar = _progress(self.steps, state.step, opts.progress and main)
        blends = swap_blends(student, install=True) if opts.blend > 0 else []
        taps = (LayerTaps(converted_parents(student), student, self.trainer.teacher,
                          state.tap_scales) if opts.layer_weight else None)  # fmt: skip
        model = self.trainer.wrap()
        student.train(opts.train_mode)
        try:
            while state.step < self.steps:
                for b in blends:
                    b.alpha = self.trainer.schedule.blend_alpha(state.step)
                record = {"step": state.step + 1, **self.trainer.step(model, taps, next(batches))}
                state.step += 1
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                bar.update(1)
                _after_step(self, record, log, eval_batches)
        finally:
            bar.close()
            if log is not None:
                log.close()
            if taps is not None:
                taps.remove()
            if blends:
                swap_blends(student, install=False)


def _after_step(
    run: _Run, record: dict[str, Any], log: curves.JsonLog | None, eval_batches: list[Any]
) -> None:
    """Record the step; evaluate and checkpoint when one is due."""
    opts, state = run.opts, run.state
    if opts.eval_every and state.step % opts.eval_every == 0 and eval_batches:
        state.evals.append({"step": state.step, **run.trainer.evaluate(eval_batches)})
        # in the step's record too, so that the log holds the curves the user judges by
        record.update({f"held_out_{k}": v for k, v in state.evals[-1].items() if k != "step"})
    state.history.append(record)
    if log is not None:
        log.write(record)
    if opts.checkpoint_every and (
        state.step % opts.checkpoint_every == 0 or state.step == run.steps
    ):
        _checkpoint(run)


def _prepare(run: _Run, batches: Iterator[Any], eval_batches: list[Any]) -> int | None:
    """Resume, or start: the "before" evaluation and BatchNorm re-estimation. Returns the
    step resumed from, or None.

    A resumed run skips what the finished part drew from ``batches``, so it reaches the
    same batch even when each pass over ``data`` differs (a DataLoader with a seeded
    generator shuffles anew on each pass: a second stream for BatchNorm would advance that
    generator on a fresh run and not on a resumed one). Data that can seek (``stream.Seekable``:
    a streamed corpus) is sought to the position the checkpoint holds instead: nothing is read
    again."""
    resumed = _resume(run)  # replaces run.state with the checkpoint's
    opts, state, student = run.opts, run.state, run.trainer.student
    if resumed is None:
        torch.manual_seed(opts.seed)
        if eval_batches:
            n = len(eval_batches)
            run.say(f"evaluating the converted model on {n} held-out "
                    f"batch{'es' if n > 1 else ''} (before)")  # fmt: skip
            state.before = run.trainer.evaluate(eval_batches)
            for line in measures.headline({}, state.before, {}, measures.pool_size(eval_batches)):
                run.say(f"  before recovery, {line}")
        if opts.fit_batches:
            _fit(run, batches, eval_batches)
        if opts.bn_batches and has_batchnorm(student):
            run.say(f"re-estimating BatchNorm statistics on {opts.bn_batches} batches")
            local = (distributed.shard(b, run.world) for b in _take(batches, opts.bn_batches))
            state.bn_drawn += reestimate_batchnorm(student, local, run.device)
    elif state.bn_drawn + state.step:
        drawn = state.bn_drawn + state.step
        if state.data_position is not None and isinstance(run.data, Seekable):
            run.say(f"seeking the data past the {drawn} batches drawn before the checkpoint")
            run.data.seek(state.data_position)  # before the first draw from ``batches``
            return resumed
        run.say(f"skipping the {drawn} batches drawn before the checkpoint (the fit's, BatchNorm "
                "re-estimation's and the finished steps')")  # fmt: skip
        for _ in range(drawn):
            next(batches)
    return resumed


def _fit(run: _Run, batches: Iterator[Any], eval_batches: list[Any]) -> None:
    """Fit each converted Serf to the activation it replaced and fold the scales into the
    weights (:mod:`serfswap.recovery.fit`), on the first ``fit_batches`` batches; the
    held-out figures after it. Under torchrun every rank fits on the whole global batches (no
    gradients are kept), so all fold the scales a single process folds; under FSDP each rank
    scales its shards of the same parameters."""
    opts = run.opts
    if opts.blend:
        run.say("no fit of the Serfs to the original activations with blend on")
        return
    run.say(f"fitting each Serf to the activation it replaced on {opts.fit_batches} batches")
    drawn = list(_take(batches, opts.fit_batches))
    run.state.bn_drawn += len(drawn)
    fits = fit.fit_activations(run.trainer.student, drawn, run.device)
    run.state.tap_scales = fit.holder_scales(fits)
    run.say(fit.summary(fits))
    if eval_batches and any(f.folded for f in fits):
        run.state.fitted = run.trainer.evaluate(eval_batches)
        for line in measures.headline({}, run.state.fitted, {}, measures.pool_size(eval_batches)):
            run.say(f"  after the fit, {line}")


def _resume(run: _Run) -> int | None:
    """Load the newest checkpoint when resuming; the step it was taken at, or None."""
    if run.folder is None:
        return None
    found: tuple[Path | None, str | None] = (None, None)
    if run.world.main:  # one process decides, so that all resume from the same step
        try:
            found = (trainstate.check_folder(run.folder, run.opts.resume), None)
            trainstate.remove_partial(run.folder)
        except InvalidArgumentError as exc:
            found = (None, str(exc))
    path, error = distributed.broadcast(found, run.world)
    if error is not None:  # raised on every rank: none is left waiting for the others
        raise InvalidArgumentError(error)
    if path is None:
        if run.opts.resume:  # e.g. the checkpoints of a finished run were removed
            run.say(f"no checkpoint in {run.folder} to resume from: starting at step 0")
        return None
    if trainstate.sharded(path):  # the weights are loaded with the optimizer's shards
        saved = trainstate.read_checked(path, run.steps)
    else:
        fsdp.check_whole_checkpoint(path, run.trainer.sharded)
        saved = trainstate.load(path, run.trainer.student, steps=run.steps)
    run.trainer.restore(saved, path)
    # The record carries on; the snapshots are in the optimizer and the schedule now.
    run.state = replace(saved, steps=run.steps, optimizer={}, scheduler={}, rng=[])
    run.last_checkpoint = path
    if saved.steps < run.steps:  # a finished run, extended
        _extend(run, saved.steps)
    else:
        run.say(f"resumed from {path} at step {saved.step} of {run.steps}")
    return saved.step


def _extend(run: _Run, finished: int) -> None:
    """Plan the steps from ``finished`` to the run's steps as a new segment of the schedule
    (see :meth:`Schedule.extend`). Weights, AdamW moments, RNG states and the data position
    carry on."""
    opts = run.opts
    lr = opts.lr if opts.lr is not None else run.trainer.schedule.peak()  # the finished run's
    warm = run.trainer.schedule.extend(finished, run.steps, lr, run.state.step)
    run.say(
        f"extending the finished run of {finished} steps to {run.steps}: the learning rate "
        f"warms up again to {lr:g} over {warm} steps, then decays by cosine to 0 "
        f"at step {run.steps}"
    )


def _checkpoint(run: _Run) -> None:
    """Write a checkpoint of the run as it stands (the main process writes; all gather their
    RNG states for it and wait until it is written)."""
    if isinstance(run.data, Seekable):
        run.state.data_position = run.data.data_position()
    rngs = distributed.gather(trainstate.rng_state(), run.world)
    if run.opts.fsdp and run.folder is not None:  # every rank writes its shards
        snapshot = run.trainer.snapshot(run.state, rngs)
        run.last_checkpoint = fsdp.save_shards(run.folder, run.trainer.student,
                                               run.trainer.optimizer, snapshot, run.opts.keep,
                                               run.world)  # fmt: skip
        return
    if run.world.main and run.folder is not None:
        snapshot = run.trainer.snapshot(run.state, rngs)
        run.last_checkpoint = trainstate.save(run.folder, run.trainer.student, snapshot,
                                              run.opts.keep)  # fmt: skip
    distributed.barrier(run.world)


def _cycle(data: Iterable[Any]) -> Iterator[Any]:
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise InvalidArgumentError("data yielded no batch")


def _take(batches: Iterator[Any], n: int) -> Iterator[Any]:
    for _, batch in zip(range(n), batches, strict=False):
        yield batch


def _progress(steps: int, done: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=steps, initial=done, desc="recover", unit="step", disable=not enabled)
