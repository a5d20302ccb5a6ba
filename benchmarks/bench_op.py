"""Speed and memory of serfswap.serf against the activations it replaces, in one run.

Times forward and forward+backward of serf, F.mish, F.gelu, F.silu and the plain composite
``x * erf(softplus(x))`` on one large float32 tensor, interleaving the candidates round by
round so that machine noise hits all of them alike, and prints each median with its ratio
to F.mish (the native kernel Serf is closest to). Also prints the bytes autograd keeps for
backward per input element. Runs on CPU, and on CUDA too when there is a device.

On CUDA it also prints, for float32 and bfloat16, the bandwidth each op achieves as a share of
a device-to-device copy of the same bytes, timed in the same run: the limit of an elementwise op
(forward reads x and writes y; forward+backward also reads grad and x and writes dx). The
targets for Serf's fused Triton kernels: at least 80% of copy bandwidth, no slower than F.gelu.

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
from serfswap.ops.serf import serf_composite

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


BANDWIDTH_CANDIDATES = ("serfswap.serf", "F.mish", "F.gelu")


def _cuda_median_ms(fn: Callable[[], object], rounds: int) -> float:
    """Median of ``rounds`` timings with CUDA events, each over enough calls to last ~10 ms."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    calls = max(1, int(10 / max(start.elapsed_time(end), 1e-3)))
    times = []
    for _ in range(rounds):
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def bench_cuda_bandwidth(shape: list[int], rounds: int) -> None:
    """The CUDA table: time and share of copy bandwidth, float32 and bfloat16."""
    device = torch.device("cuda")
    print(
        f"\ncuda ({torch.cuda.get_device_name(device)}): {'x'.join(map(str, shape))}, median of "
        f"{rounds} rounds; bandwidth as a share of a device-to-device copy of the same bytes"
    )
    print("| dtype    | op             | fwd ms | fwd / copy BW | fwd+bwd ms | fwd+bwd / copy BW |")
    print("|----------|----------------|--------|---------------|------------|-------------------|")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(shape, device=device, dtype=dtype)
        grad = torch.randn_like(x)
        x_req = x.clone().requires_grad_()
        copy_dst = torch.empty_like(x)
        nbytes = x.numel() * x.element_size()
        copy_ms = _cuda_median_ms(lambda: copy_dst.copy_(x), rounds)  # noqa: B023
        copy_bw = 2 * nbytes / copy_ms  # bytes per ms: one read, one write
        for name in BANDWIDTH_CANDIDATES:
            fn = CANDIDATES[name]

            def forward(fn=fn) -> None:
                with torch.no_grad():
                    fn(x)  # noqa: B023

            def forward_backward(fn=fn) -> None:
                fn(x_req).backward(grad)  # noqa: B023
                x_req.grad = None  # noqa: B023

            f_ms = _cuda_median_ms(forward, rounds)
            fb_ms = _cuda_median_ms(forward_backward, rounds)
            f_share = 2 * nbytes / f_ms / copy_bw  # reads x, writes y
            fb_share = 5 * nbytes / fb_ms / copy_bw  # + reads grad and x, writes dx
            dtype_name = str(dtype).removeprefix("torch.")
            print(
                f"| {dtype_name:<8} | {name:<14} | {f_ms:6.3f} | {f_share:13.0%} | "
                f"{fb_ms:10.3f} | {fb_share:17.0%} |"
            )
        print(
            f"| {str(dtype).removeprefix('torch.'):<8} | copy           | {copy_ms:6.3f} | "
            f"{1:13.0%} |            |                   |"
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
    if torch.cuda.is_available() and args.device in ("cuda", "all"):
        bench_cuda_bandwidth(args.shape, args.rounds)
    elif args.device == "all":
        print("\ncuda: no device here; the CUDA table (Triton kernels vs copy bandwidth) needs one")


if __name__ == "__main__":
    main()
