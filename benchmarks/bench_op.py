"""Speed and memory of serfswap.serf against the activations it replaces, in one run.

Times forward and forward+backward of serf, F.mish, F.gelu, F.silu and the plain composite
``x * erf(softplus(x))`` on one large float32 tensor, interleaving the candidates round by
round so that machine noise hits all of them alike, and prints each median with its ratio
to F.mish (the native kernel Serf is closest to). Also prints the bytes autograd keeps for
backward per input element. Runs on CPU, and on CUDA too when there is a device.

    python benchmarks/bench_op.py                       # 64x256x56x56, CPU (+ CUDA if present)
    python benchmarks/bench_op.py --shape 8 64 56 56 --rounds 3   # quick look
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import serfswap
from serfswap.serf import serf_composite

CANDIDATES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "serfswap.serf": serfswap.serf,
    "F.mish": F.mish,
    "F.gelu": F.gelu,
    "F.silu": F.silu,
    "composite": serf_composite,
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def saved_bytes_per_element(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    """Distinct storages autograd keeps for backward, in bytes per input element."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(storages.values()) / x.numel()


def bench(device: torch.device, shape: list[int], rounds: int) -> None:
    x = torch.randn(shape, device=device)
    grad = torch.randn_like(x)
    x_req = x.clone().requires_grad_()

    def forward(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return fn(x)

        return run

    def forward_backward(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], object]:
        def run() -> object:
            fn(x_req).backward(grad)
            x_req.grad = None

        return run

    times: dict[tuple[str, str], list[float]] = {}
    for fn in CANDIDATES.values():  # warm-up: allocator, kernels, first-touch pages
        forward(fn)()
        forward_backward(fn)()
    for _ in range(rounds):
        for name, fn in CANDIDATES.items():
            times.setdefault((name, "fwd"), []).append(_timed(forward(fn), device))
            times.setdefault((name, "fwd+bwd"), []).append(_timed(forward_backward(fn), device))

    med = {key: statistics.median(vals) for key, vals in times.items()}
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(
        f"\n{device.type}: float32 {'x'.join(map(str, shape))} "
        f"({x.numel() / 1e6:.1f}M elements{threads}), median of {rounds} rounds"
    )
    print(f"| {'op':<14} | fwd ms  | fwd / mish | fwd+bwd ms | fwd+bwd / mish | saved B/elem |")
    print("|----------------|---------|------------|------------|----------------|--------------|")
    small = x[:1].clone().requires_grad_()
    for name, fn in CANDIDATES.items():
        f, fb = med[(name, "fwd")], med[(name, "fwd+bwd")]
        print(
            f"| {name:<14} | {f * 1e3:7.1f} | {f / med[('F.mish', 'fwd')]:10.2f} | "
            f"{fb * 1e3:10.1f} | {fb / med[('F.mish', 'fwd+bwd')]:14.2f} | "
            f"{saved_bytes_per_element(fn, small):12.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[64, 256, 56, 56])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    args = parser.parse_args()
    print(
        f"serfswap {serfswap.__version__}, torch {torch.__version__}, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    devices = [torch.device("cpu")] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    elif args.device == "cuda":
        raise SystemExit("no CUDA device")
    for device in devices:
        bench(device, args.shape, args.rounds)


if __name__ == "__main__":
    main()
