"""Recovery checkpoints: everything a killed run needs to continue as if it had never stopped.

A checkpoint is a folder ``step-NNNNNNNN`` holding ``model.safetensors`` (the student's
weights and buffers) and ``state.pt`` (a :class:`RunState`: step, history, optimizer, schedule,
RNG states; the one schema, which the same class writes and reads); a sharded (FSDP) run writes
``shards/`` instead of ``model.safetensors`` (``torch.distributed.checkpoint``: each rank its
shard of the weights and of the optimizer's state, see ``fsdp.py``). It is
written into a hidden temporary folder beside it, flushed to disk, and renamed into place: a
rename is atomic, so a run killed mid-write leaves a temporary folder that is never read, never
a half-written ``step-*``. The last ``keep`` checkpoints are kept.

A run is *finished* when its newest checkpoint is of its last step. A finished run can be
extended (resumed with more steps), and is replaced when a run starts afresh in its folder; an
unfinished one is only ever continued, never overwritten.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, InvalidArgumentError

logger = logging.getLogger(__name__)

FORMAT = "serfswap-recovery/1"
_NAME = re.compile(r"^step-(\d{8})$")


@dataclass
class RunState:
    """Everything a recovery run needs to continue from a checkpoint besides the weights: the
    schema of ``state.pt``. :meth:`to_dict` writes it and :meth:`from_dict` reads it back, so
    the two cannot disagree; a field added later gets a default that reads older checkpoints.

    ``optimizer``, ``scheduler`` and ``rng`` are snapshots taken when a checkpoint is written
    (``rng``: one entry per process, each resumes with its own)."""

    steps: int  # the steps the run was planned for (more after an extension)
    step: int = 0  # the steps done
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    before: dict[str, float] = field(default_factory=dict)
    # Batches drawn from the stream before step 1: the fit's and BatchNorm re-estimation's.
    bn_drawn: int = 0
    # The held-out metrics after the fit (fit.py), before step 1; empty without one.
    fitted: dict[str, float] = field(default_factory=dict)
    # Layer matching's factor on the student's output of a fitted Serf's holder (fit.py).
    tap_scales: dict[str, float | list[float]] = field(default_factory=dict)
    # Where seekable data (stream.Seekable) stood after the batches drawn: a resumed run seeks
    # there instead of drawing them again. None for other data, and in older checkpoints.
    data_position: dict[str, int] | None = None
    # [start, end) of each planned segment of the learning-rate schedule (see schedule.py);
    # absent from checkpoints written before extensions: one segment, the whole run.
    segments: list[tuple[int, int]] = field(default_factory=list)
    optimizer: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    rng: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.segments = [(int(a), int(b)) for a, b in self.segments] or [(0, self.steps)]

    def to_dict(self) -> dict[str, Any]:
        """What ``state.pt`` holds (plain data: torch's weights-only loader reads it)."""
        # Not dataclasses.asdict, which deep-copies every tensor of the optimizer's state.
        return {"format": FORMAT, **{f.name: getattr(self, f.name) for f in fields(self)}}

    @classmethod
    def from_dict(cls, state: Any, path: Path) -> RunState:
        """The state :meth:`to_dict` wrote; a CheckpointError for anything else."""
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not a serfswap recovery checkpoint")
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in state.items() if k in known})
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: a damaged recovery checkpoint ({exc})") from None


def rng_state() -> dict[str, Any]:
    """The random states a step can consume (dropout, shuffling): torch CPU, CUDA, Python."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``folder``, oldest first (temporary folders are not listed)."""
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        weights = (entry / "model.safetensors").is_file() or sharded(entry)
        if match and (entry / "state.pt").is_file() and weights:
            found.append((int(match.group(1)), entry))
    return sorted(found)


def save(folder: Path, model: nn.Module, state: RunState, keep: int) -> Path:
    """Write the checkpoint of ``state.step`` atomically, then drop all but the newest
    ``keep``."""
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{state.step:08d}-", dir=folder))
    try:
        save_model(model, str(tmp / "model.safetensors"))  # shared tensors saved once
        with open(tmp / "model.safetensors", "rb") as handle:
            os.fsync(handle.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit(tmp, folder, state, keep)


def sharded(path: Path) -> bool:
    """Whether checkpoint ``path`` holds its weights as a sharded (FSDP) run writes them."""
    return (path / "shards" / ".metadata").is_file()


def commit(tmp: Path, folder: Path, state: RunState, keep: int) -> Path:
    """Add ``state.pt`` to the temporary folder ``tmp`` that holds the weights, rename it into
    place as the checkpoint of ``state.step``, then drop all but the newest ``keep``."""
    final = folder / f"step-{state.step:08d}"
    try:
        torch.save(state.to_dict(), tmp / "state.pt")
        with open(tmp / "state.pt", "rb") as handle:
            os.fsync(handle.fileno())
        if final.exists():  # a checkpoint of the same step from an earlier, longer-lived run
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(folder)
    for _, old in checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: Path, model: nn.Module, steps: int) -> RunState:
    """Load the weights of checkpoint ``path`` into ``model``; return the rest of its state.
    The state is checked before the model is touched: its format, and ``steps``, which must be
    the run's own, or more when the run has finished (an extension). A wrong ``steps`` is the
    caller's mistake (InvalidArgumentError); a damaged file is a CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    state = read_checked(path, steps)
    try:
        load_model(model, str(path / "model.safetensors"), strict=True)
    except (SafetensorError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: weights do not fit this model ({exc})") from None
    return state


def read_checked(path: Path, steps: int) -> RunState:
    """The state of checkpoint ``path`` when a run of ``steps`` may continue from it (see
    :func:`load`)."""
    state = _read(path)
    done, planned = state.step, state.steps
    if steps < planned:
        raise InvalidArgumentError(
            f"{path} belongs to a run of {planned} steps, not {steps}: a run cannot be "
            f"shortened; resume with steps={planned} (--steps {planned}), or start in another "
            "folder"
        )
    if steps > planned and done < planned:
        raise InvalidArgumentError(
            f"{path} belongs to a run of {planned} steps, not {steps}, stopped at step {done}: "
            f"finish it first (resume with --steps {planned}), then extend it to more steps"
        )
    return state


def progress(path: Path) -> tuple[int, int]:
    """(step, steps) of checkpoint ``path``: where its run stood, and how long it was planned.
    Reads no tensor (the file is memory-mapped)."""
    state = _read(path, mmap=True)
    return int(state.step), int(state.steps)


def _read(path: Path, *, mmap: bool = False) -> RunState:
    """The :class:`RunState` of checkpoint ``path``; a CheckpointError when it cannot be read
    (a checkpoint that is not ours, or damaged after it was written)."""
    try:
        raw = torch.load(path / "state.pt", map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read state.pt ({exc})") from None
    return RunState.from_dict(raw, path)


def check_folder(folder: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None: start afresh, also when resuming a folder that
    holds no checkpoint yet). Starting afresh where a finished run is replaces it: its result
    has been returned, and the same call computes it again. An unfinished run is only continued
    on request (``resume``), never overwritten."""
    if folder.exists() and not folder.is_dir():
        raise InvalidArgumentError(f"checkpoint folder {folder} is a file")
    found = checkpoints(folder)
    if found and not resume:
        step, steps = progress(found[-1][1])
        if step < steps:
            raise InvalidArgumentError(
                f"{folder} holds an unfinished recovery run (step {step} of {steps}): pass "
                "resume=True (--resume) to continue it, or choose another folder"
            )
        remove_run(folder)
        logger.info(f"{folder} held a finished run of {steps} steps: starting over (resume "
                    "with more steps extends a finished run instead)")  # fmt: skip
        return None
    return found[-1][1] if found else None


def remove_run(folder: Path) -> int:
    """Delete the checkpoints of the run in ``folder`` (and the folder when nothing else is
    left in it); returns how many were removed. Other files in the folder are left."""
    found = [path for _, path in checkpoints(folder)]
    for path in found:
        shutil.rmtree(path)
    remove_partial(folder)
    with contextlib.suppress(OSError):  # not empty, or already gone
        folder.rmdir()
    return len(found)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_partial(folder: Path) -> int:
    """Delete the temporary folders of writes that a kill interrupted; returns how many."""
    stale = list(folder.glob(".tmp-step-*")) if folder.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return len(stale)
