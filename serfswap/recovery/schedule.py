"""The schedule of a recovery run: the learning rate (linear warmup, then cosine decay to 0, in
each planned segment of the run) and the ramp of the activation blend.

A run has one segment ``[0, steps)``; each extension of a finished run (``resume=True`` with
more ``steps``) adds one, a warm restart: the finished run's cosine has decayed to 0, so
continuing it would not train, and re-planning it over the longer run would jump to a mid-cosine
rate. The segments are part of a run's checkpoint (:class:`serfswap.recovery.state.RunState`).
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, segments: list[tuple[int, int]], warmup: float) -> float:
    """The learning-rate factor at ``step``: within each segment ``[start, end)`` of the run,
    linear warmup over ``warmup`` of its steps, then cosine decay to 0 at its end."""
    start, end = segments[-1]
    for a, b in segments:
        if step < b:
            start, end = a, b
            break
    local, length = step - start, end - start
    warm = max(1, int(warmup * length))
    if local < warm:
        return (local + 1) / warm
    progress = (local - warm) / max(1, length - warm)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class Schedule:
    """The learning rate of ``optimizer`` over the run's segments (a ``LambdaLR``), and the
    blend ramp: ``blend`` of the first segment's steps (extensions do not ramp again)."""

    def __init__(self, optimizer: torch.optim.Optimizer, steps: int, *, warmup: float,
                 blend: float) -> None:  # fmt: skip
        self.optimizer, self.warmup, self.blend = optimizer, warmup, blend
        # [start, end) of each planned part of the run: one, plus one per extension.
        self.segments: list[tuple[int, int]] = [(0, steps)]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, self.segments, warmup)
        )

    def blend_alpha(self, step: int) -> float:
        """How far the blend of the converted activations has gone at ``step`` (0-based)."""
        ramp = max(1, int(self.blend * self.segments[0][1]))
        return min(1.0, (step + 1) / ramp)

    def step(self) -> None:
        """Advance the learning rate by one optimiser step."""
        self.scheduler.step()

    def last_lr(self) -> float:
        """The learning rate of the step just taken."""
        return self.scheduler.get_last_lr()[0]

    def restore(self, scheduler_state: dict, segments: list[tuple[int, int]]) -> None:
        """Back to where a checkpoint's run stood (see :meth:`state`)."""
        self.scheduler.load_state_dict(scheduler_state)
        self.segments = [(int(a), int(b)) for a, b in segments]

    def state(self) -> tuple[dict, list[tuple[int, int]]]:
        """The scheduler's state and the segments, for a checkpoint."""
        return self.scheduler.state_dict(), list(self.segments)

    def peak(self) -> float:
        """The peak learning rate the schedule is planned to."""
        return float(self.scheduler.base_lrs[0])

    def set_peak(self, lr: float) -> None:
        """Plan to ``lr`` instead, from the step about to be taken on (the kind of model, and
        so its default rate, is known only at the first step)."""
        factor = lr_factor(self.scheduler.last_epoch, self.segments, self.warmup)
        for group in self.optimizer.param_groups:
            group["initial_lr"], group["lr"] = lr, lr * factor
        self.scheduler.base_lrs = [lr] * len(self.optimizer.param_groups)

    def extend(self, finished: int, steps: int, lr: float, step: int) -> int:
        """Plan the steps from ``finished`` to ``steps`` as a new segment: warmup over
        ``warmup`` of the added steps to ``lr``, cosine decay to 0 at the new end. The rate of
        the next step (``step``) is set now, not left at the finished run's 0. Returns the
        warmup's length in steps."""
        self.segments.append((finished, steps))
        for group in self.optimizer.param_groups:
            group["initial_lr"] = lr
        self.scheduler.base_lrs = [lr] * len(self.optimizer.param_groups)
        factor = lr_factor(step, self.segments, self.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * factor
        return max(1, int(self.warmup * (steps - finished)))
