"""Run a Serf model under torch.compile and check it against eager, forward and backward.

    python examples/torch_compile.py                     # resnet18, inductor (compiles C++: ~1 min)
    python examples/torch_compile.py --backend aot_eager # no code generation, quick to compile
    python examples/torch_compile.py --quick             # tiny models, aot_eager, a few seconds

Under a tracer Serf is standard ATen ops (softplus, erf, mul), which inductor fuses with their
neighbours, recomputing them in the backward so that only the input is kept, as the eager op
does. ``fullgraph=True`` holds: no graph break where a module's activation was swapped, and
none where a module's code called ``F.gelu(x)`` (serfswap converts such call sites with a mode
scoped to that module's forward, which dynamo traces through). Inductor on the CPU generates
and compiles C++, which takes tens of seconds even for a small network; ``aot_eager`` checks
the same graph capture without it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F
from torch import nn

import serfswap


class Block(nn.Module):
    """A residual MLP that calls its activation as a function, not as a submodule."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))  # a functional call site


def median_ms(fn: Callable[[], object], runs: int = 5) -> float:
    """Median wall time in milliseconds, after a warm-up call (which may compile)."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def check(name: str, original: nn.Module, x: torch.Tensor, backend: str) -> None:
    """Convert, compile with fullgraph=True, and compare with eager: outputs and gradients."""
    eager = serfswap.convert(original).eval()
    sites = {s.kind for s in eager.serfswap_report.converted}
    compiled = torch.compile(eager, backend=backend, fullgraph=True)

    start = time.perf_counter()
    with torch.no_grad():
        got = compiled(x)  # the first call compiles
        want = eager(x)
        before = original(x)
    seconds = time.perf_counter() - start
    print(f"{name}: Serf at {sorted(sites)} sites; compiled ({backend}) in {seconds:.1f} s")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, before), "compiled, it must still compute Serf, not the original"
    print(f"  forward: max abs diff compiled vs eager {(got - want).abs().max():.2e}")

    # Backward through the compiled graph: Serf's analytic backward is traced as well.
    grads = []
    for model in (compiled, eager):
        inputs = x.clone().requires_grad_()
        model(inputs).square().mean().backward()
        grads.append(inputs.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    print(f"  backward: max abs diff of input gradients {(grads[0] - grads[1]).abs().max():.2e}")

    with torch.no_grad():
        eager_ms, compiled_ms = median_ms(lambda: eager(x)), median_ms(lambda: compiled(x))
    print(f"  median time: eager {eager_ms:.2f} ms, compiled {compiled_ms:.2f} ms")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", help="a timm model name")
    parser.add_argument("--backend", default="inductor", help="inductor, aot_eager, eager...")
    parser.add_argument("--quick", action="store_true", help="tiny models with aot_eager")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.backend = "test_resnet", "aot_eager"
    torch.manual_seed(0)

    # 1. A plain module whose code calls F.gelu: a functional site.
    check("Block (F.gelu in forward)", Block(64).eval(), torch.randn(8, 16, 64), args.backend)

    # 2. A timm model: activation modules (nn.ReLU) swapped for Serf modules.
    model = timm.create_model(args.model, pretrained=False).eval()
    size = 64 if args.quick else model.pretrained_cfg["input_size"][-1]
    check(args.model, model, torch.randn(2, 3, size, size), args.backend)


if __name__ == "__main__":
    main()
