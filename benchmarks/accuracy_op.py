"""Accuracy of serfswap.serf (and of the plain composite) against a float64 reference.

Prints, for the dense sweep x in [-100, 100] (step 1e-4) the tests use: the max relative error
in float32 where the result is a normal number, overall and in the subnormal tail of exp(x);
for float16 and bfloat16 the max error in units in the last place of the rounded reference;
and the max difference between serf's analytic gradient and autograd of the composite.

    python benchmarks/accuracy_op.py
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

import serfswap
from serfswap.ops.serf import serf_composite


def reference(x: torch.Tensor) -> torch.Tensor:
    x64 = x.double()
    return x64 * torch.erf(F.softplus(x64))


def max_rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    normal = torch.isfinite(ref) & (ref.abs() >= torch.finfo(got.dtype).tiny)
    return ((got.double() - ref).abs() / ref.abs())[normal].max().item()


def max_ulp_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    rounded = ref.to(got.dtype)
    finite = torch.isfinite(rounded)
    up = torch.nextafter(rounded.abs(), torch.full_like(rounded, float("inf")))
    ulp = (up.double() - rounded.abs().double())[finite]
    return ((got.double() - rounded.double())[finite].abs() / ulp).max().item()


def grad(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_()
    (g,) = torch.autograd.grad(fn(x), x, torch.ones_like(x))
    return g


def main() -> None:
    x = torch.linspace(-100, 100, 2_000_001)
    ref = reference(x)
    tail = (x > -92) & (x < -87.3)
    print("| measure | serfswap.serf | composite |")
    print("|---|---|---|")
    for label, mask in (
        ("float32 max rel err, [-100, 100]", slice(None)),
        ("  of which x in (-92, -87.3)", tail),
    ):
        ours = max_rel_err(serfswap.serf(x)[mask], ref[mask])
        theirs = max_rel_err(serf_composite(x)[mask], ref[mask])
        print(f"| {label} | {ours:.2e} | {theirs:.2e} |")
    for dtype in (torch.float16, torch.bfloat16):
        xh = x.to(dtype)
        ours = max_ulp_err(serfswap.serf(xh), reference(xh))
        theirs = max_ulp_err(serf_composite(xh), reference(xh))
        print(f"| {str(dtype).removeprefix('torch.')} max err, ulp | {ours:.2f} | {theirs:.2f} |")
    for dtype in (torch.float32, torch.float64):
        xd = x.to(dtype)
        diff = (grad(serfswap.serf, xd) - grad(serf_composite, xd)).abs().max().item()
        name = str(dtype).removeprefix("torch.")
        print(f"| {name} max abs grad diff vs composite | {diff:.2e} | (reference) |")


if __name__ == "__main__":
    main()
