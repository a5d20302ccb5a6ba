"""The record of a recovery run: a JSON-lines log written as it goes, and a PNG of the curves."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from ..errors import InvalidArgumentError, install_hint


class JsonLog:
    """One JSON object per line and per step, flushed as written, so that ``tail -f`` and a
    killed run both see every finished step. A resumed run rewrites the history it resumed
    with, then appends: the log always describes the weights."""

    def __init__(self, path: Path, history: Iterable[dict[str, Any]] = ()) -> None:
        self.handle: IO[str] = open(path, "w", encoding="utf-8")  # noqa: SIM115 (closed in close)
        for record in history:
            self.write(record)

    def write(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def require_matplotlib() -> None:
    """Fail before training, not after it, when a plot is asked for and cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InvalidArgumentError(
            f"plotting the curves needs matplotlib: {install_hint('plot')}", option="plot"
        ) from None


def plot(history: list[dict[str, float]], evals: list[dict[str, float]], path: Path) -> Path:
    """Loss terms (log scale) and learning rate over steps; held-out agreement and cosine over
    steps when the run evaluated as it went. Written to a temporary name, then renamed."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    panels = 2 if evals else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4), squeeze=False)
    ax = axes[0][0]
    steps = [r["step"] for r in history]
    for key in ("loss", "output", "layer", "task", "relational"):
        if any(key in r for r in history):
            ax.plot(steps, [r.get(key, float("nan")) for r in history], label=key,
                    linewidth=1.6 if key == "loss" else 1.0)  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in history], color="grey", linestyle=":", label="lr")
    lr_ax.set_ylabel("learning rate")
    lines = ax.get_legend_handles_labels()
    extra = lr_ax.get_legend_handles_labels()
    ax.legend(lines[0] + extra[0], lines[1] + extra[1], fontsize=8)
    ax.set_title("serfswap recovery")
    if evals:
        ax = axes[0][1]
        for key in ("agreement", "cosine", "accuracy"):
            if any(key in e for e in evals):
                ax.plot([e["step"] for e in evals], [e.get(key, float("nan")) for e in evals],
                        marker="o", label=key)  # fmt: skip
        ax.set_xlabel("step")
        ax.set_title("held out, against the teacher")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
