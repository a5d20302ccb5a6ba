"""Plot Serf beside ReLU, GELU, SiLU and Mish, and their derivatives: writes docs/serf.png.

    python scripts/plot_serf.py [--out docs/serf.png]

Needs matplotlib (the ``plot`` extra). The curves are computed with torch, Serf with
``serfswap.serf`` itself and every derivative by autograd, so the figure shows what the
package computes (Serf's derivative is its analytic backward), not a re-derivation.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, and none is there on CI

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import serfswap

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "serf.png"

# (label, function, matplotlib style): Serf drawn last and thickest, on top of the others.
CURVES: list[tuple[str, Callable[[torch.Tensor], torch.Tensor], dict[str, object]]] = [
    ("ReLU", F.relu, {"color": "0.55", "linestyle": ":", "linewidth": 1.6}),
    ("GELU", F.gelu, {"color": "tab:green", "linestyle": "--", "linewidth": 1.6}),
    ("SiLU / Swish", F.silu, {"color": "tab:orange", "linestyle": "-.", "linewidth": 1.6}),
    ("Mish", F.mish, {"color": "tab:blue", "linestyle": (0, (5, 1, 1, 1)), "linewidth": 1.6}),
    ("Serf", serfswap.serf, {"color": "tab:red", "linewidth": 2.6}),
]


def values_and_derivatives(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """f(x) and f'(x) by autograd (elementwise functions: the gradient of the sum is f')."""
    x = x.clone().requires_grad_()
    y = fn(x)
    (dy,) = torch.autograd.grad(y.sum(), x)
    return y.detach(), dy


def plot(out: Path, derivatives: bool = True) -> Path:
    x = torch.linspace(-5, 3, 1601, dtype=torch.float64)
    panels = 2 if derivatives else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.2 * panels, 4.6), squeeze=False)
    value_ax = axes[0][0]
    for label, fn, style in CURVES:
        y, dy = values_and_derivatives(fn, x)
        value_ax.plot(x, y, label=label, **style)
        if derivatives:
            axes[0][1].plot(x, dy, label=label, **style)

    value_ax.set_title("Serf(x) = x · erf(softplus(x)) and its neighbours")
    value_ax.set_ylabel("f(x)")
    value_ax.set_ylim(-0.6, 3)
    if derivatives:
        axes[0][1].set_title("derivatives $f'(x)$")
        axes[0][1].set_ylabel("$f'(x)$")
        axes[0][1].set_ylim(-0.25, 1.25)
    for ax in axes[0]:
        ax.axhline(0, color="black", linewidth=0.6)
        ax.axvline(0, color="black", linewidth=0.6)
        ax.set_xlim(-5, 3)
        ax.set_xlabel("x")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", frameon=False)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--no-derivatives", action="store_true", help="one panel, values only")
    args = parser.parse_args(argv)
    print(f"wrote {plot(args.out, derivatives=not args.no_derivatives)}")


if __name__ == "__main__":
    main()
