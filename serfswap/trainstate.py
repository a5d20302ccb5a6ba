"""Recovery checkpoints: everything a killed run needs to continue as if it had never stopped.

A checkpoint is a folder ``step-NNNNNNNN`` holding ``model.safetensors`` (the student's
weights and buffers) and ``state.pt`` (optimizer, scheduler, RNG states, step, history). It is
written into a hidden temporary folder beside it, flushed to disk, and renamed into place: a
rename is atomic, so a run killed mid-write leaves a temporary folder that is never read, never
a half-written ``step-*``. The last ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, InvalidArgumentError

FORMAT = "serfswap-recovery/1"
_NAME = re.compile(r"^step-(\d{8})$")


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
        if match and (entry / "state.pt").is_file() and (entry / "model.safetensors").is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def save(folder: Path, step: int, model: nn.Module, state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint ``step`` atomically, then drop all but the newest ``keep``."""
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:08d}-", dir=folder))
    try:
        save_model(model, str(tmp / "model.safetensors"))  # shared tensors saved once
        torch.save({"format": FORMAT, "step": step, **state}, tmp / "state.pt")
        for path in (tmp / "model.safetensors", tmp / "state.pt"):
            with open(path, "rb") as handle:
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


def load(path: Path, model: nn.Module, steps: int) -> dict[str, Any]:
    """Load the weights of checkpoint ``path`` into ``model``; return the rest of its state.
    The state is checked (format, a run of ``steps`` steps) before the model is touched."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # a checkpoint that is not ours, or damaged after it was written
        raise CheckpointError(f"{path}: cannot read state.pt ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a serfswap recovery checkpoint")
    if state["steps"] != steps:
        raise CheckpointError(
            f"{path} belongs to a run of {state['steps']} steps, not {steps}: resume with the "
            "same steps, or start in another folder"
        )
    try:
        load_model(model, str(path / "model.safetensors"), strict=True)
    except (SafetensorError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: weights do not fit this model ({exc})") from None
    return state


def check_folder(folder: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None: start afresh, also when resuming a folder that
    holds no checkpoint yet). A folder that holds a run is only continued on request, never
    overwritten."""
    if folder.exists() and not folder.is_dir():
        raise InvalidArgumentError(f"checkpoint folder {folder} is a file")
    found = checkpoints(folder)
    if found and not resume:
        raise InvalidArgumentError(
            f"{folder} already holds a recovery run (step {found[-1][0]}): pass resume=True "
            "(--resume) to continue it, or choose another folder"
        )
    return found[-1][1] if found else None


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
