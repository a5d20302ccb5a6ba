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

With ``--contended`` it times serf against F.mish on CPU only, under three conditions: 1 thread
on a quiet CPU, 2 threads, and 2 threads while one other busy process (a pure-Python loop that
this script starts, on the same cores) shares the CPU, as DataLoader workers or another job do
during recovery. Targets (issue 30): forward+backward <= 1.0x F.mish with 1 thread, <= 1.3x with
2 threads and the busy neighbour. Ratios are medians over rounds of the per-round ratio, with the
worst round beside them (a shared CPU shows up as a bad worst round first).

    python benchmarks/bench_op.py --contended          # 16x256x56x56, 21 rounds

With ``--recovery`` it times what the op is for, recovery steps: serfswap.recover of
all-MiniLM-L6-v2 converted to Serf and, as the baseline, of an unconverted copy (GELU), both
distilled from the original on the same batches of 32 sentences (64 tokens), with 2 threads on a
quiet CPU and beside the busy neighbour, interleaved. Done means (issue 30): the busy neighbour
slows a Serf step no more than it slows a GELU step.

    python benchmarks/bench_op.py --recovery           # 5 rounds of 3 steps
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
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


CONDITIONS = (  # label, threads, with a busy neighbour
    ("1 thread, quiet", 1, False),
    ("2 threads, quiet", 2, False),
    ("2 threads, busy neighbour", 2, True),
)


def _busy_neighbour() -> subprocess.Popen:
    """One other busy process on this process's cores: a pure-Python loop that never sleeps."""
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    if hasattr(os, "sched_setaffinity"):  # Linux: the same cores as this process
        os.sched_setaffinity(neighbour.pid, os.sched_getaffinity(0))
    return neighbour


def _contended_rounds(
    shape: list[int], rounds: int, threads: int, busy: bool
) -> dict[tuple[str, str], list[float]]:
    """Per-round times of serf and F.mish, forward and forward+backward, interleaved."""
    x = torch.randn(shape)
    grad = torch.randn_like(x)
    x_req = x.clone().requires_grad_()
    runs = {}
    for name in ("serfswap.serf", "F.mish"):
        fn = CANDIDATES[name]

        def forward(fn=fn) -> None:
            with torch.no_grad():
                fn(x)

        def forward_backward(fn=fn) -> None:
            fn(x_req).backward(grad)
            x_req.grad = None

        runs[(name, "fwd")], runs[(name, "fwd+bwd")] = forward, forward_backward
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    neighbour = _busy_neighbour() if busy else None
    try:
        for run in runs.values():  # warm-up, also lets the neighbour start spinning
            run()
        times: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
        for _ in range(rounds):
            for key, run in runs.items():
                times[key].append(_timed(run, torch.device("cpu")))
    finally:
        torch.set_num_threads(saved_threads)
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    return times


def bench_contended(shape: list[int], rounds: int) -> None:
    """serf against F.mish on CPU: 1 thread quiet, 2 threads, 2 threads beside a busy process."""
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(
        f"\ncpu contended: float32 {'x'.join(map(str, shape))}, {rounds} rounds, load average "
        f"{load} before; ratio = median of the per-round serf / F.mish ratios (worst round in "
        f"brackets); 'quiet' = no neighbour started by this script"
    )
    print("| condition                 | pass    | serf ms | mish ms | serf / mish       |")
    print("|---------------------------|---------|---------|---------|-------------------|")
    for label, threads, busy in CONDITIONS:
        times = _contended_rounds(shape, rounds, threads, busy)
        for kind in ("fwd", "fwd+bwd"):
            serf_t, mish_t = times[("serfswap.serf", kind)], times[("F.mish", kind)]
            ratios = [s / m for s, m in zip(serf_t, mish_t, strict=True)]
            print(
                f"| {label:<25} | {kind:<7} | {statistics.median(serf_t) * 1e3:7.1f} | "
                f"{statistics.median(mish_t) * 1e3:7.1f} | "
                f"{f'{statistics.median(ratios):5.2f}x ({max(ratios):5.2f}x)':<17} |"
            )


def _step_seconds(student: torch.nn.Module, teacher: torch.nn.Module, batches: list,
                  steps: int) -> float:  # fmt: skip
    """Seconds per recovery step: no fit, no BatchNorm pass, no evaluation, so what is timed is
    the steps (teacher forward, student forward and backward, AdamW) and the run's setup."""
    result = serfswap.recover(student, teacher, batches, steps=steps, fit_batches=0,
                              bn_batches=0, progress=False)  # fmt: skip
    return result.seconds / steps


def bench_recovery(rounds: int, steps: int = 3) -> None:
    """Recovery steps of MiniLM, Serf against GELU, quiet and beside a busy neighbour."""
    import copy

    from bench_recover import minilm

    teacher, batches, _, _, _ = minilm()
    students = {"serf": serfswap.convert(teacher), "gelu": copy.deepcopy(teacher)}
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"\nrecovery steps: all-MiniLM-L6-v2, batch 32 x <=64 tokens, 2 threads, {rounds} rounds "
          f"of {steps} steps, load average {load} before")  # fmt: skip
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    times: dict[tuple[str, bool], list[float]] = {}
    try:
        for student in students.values():  # warm-up: first-call costs out of the rounds
            _step_seconds(student, teacher, batches, 1)
        for _ in range(rounds):
            for busy in (False, True):
                neighbour = _busy_neighbour() if busy else None
                try:
                    for name, student in students.items():
                        seconds = _step_seconds(student, teacher, batches, steps)
                        times.setdefault((name, busy), []).append(seconds)
                finally:
                    if neighbour is not None:
                        neighbour.kill()
                        neighbour.wait()
    finally:
        torch.set_num_threads(saved_threads)

    def ratio(a: list[float], b: list[float]) -> float:  # median of the per-round ratios
        return statistics.median(x / y for x, y in zip(a, b, strict=True))

    print("| student | quiet s/step | busy s/step | busy / quiet | / gelu, quiet | / gelu, busy |")
    print("|---|---|---|---|---|---|")
    for name in students:
        quiet, busy = times[(name, False)], times[(name, True)]
        versus = [f"{ratio(times[(name, b)], times[('gelu', b)]):.2f}x" for b in (False, True)]
        print(f"| {name} | {statistics.median(quiet):.2f} | {statistics.median(busy):.2f} | "
              f"{ratio(busy, quiet):.2f}x | {versus[0]} | {versus[1]} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shape", type=int, nargs="+", help="default 64 256 56 56; 16 256 56 56 with --contended"
    )
    parser.add_argument("--rounds", type=int, help="default 7 (21 with --contended)")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument(
        "--contended", action="store_true", help="CPU only: quiet, 2 threads, busy neighbour"
    )
    parser.add_argument(
        "--recovery", action="store_true", help="CPU only: MiniLM recovery steps, quiet and busy"
    )
    args = parser.parse_args()
    print(
        f"serfswap {serfswap.__version__}, torch {torch.__version__}, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPUs"
    )
    if args.contended:
        bench_contended(args.shape or [16, 256, 56, 56], args.rounds or 21)
        return
    if args.recovery:
        bench_recovery(args.rounds or 5)
        return
    args.shape, args.rounds = args.shape or [64, 256, 56, 56], args.rounds or 7
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
