"""torch.compile on Serf models: latency and training memory, eager vs compiled, original vs Serf.

Targets (issue 12): compiled Serf faster than eager Serf, for inference and for a training step;
compiled Serf's training-step peak memory no more than eager Serf's (the op keeps 4 bytes per
element for backward; under compile Serf is ATen ops, and inductor must not keep more). The
figure to beat next is compiled Serf / compiled original.

    python benchmarks/bench_compile.py                   # resnet18 and a 4-layer BERT, batch 8
    python benchmarks/bench_compile.py --rounds 3 --models bert

How memory is measured: ``tracemalloc`` does not see torch's allocations and torch keeps no
allocator statistics on CPU, so the training step is run once under ``torch.profiler`` with
``profile_memory=True``, which records every allocation and free made through torch's CPU
allocator (activations, saved tensors, gradients, inductor's buffers). The peak is the highest
running sum of those events during the step, i.e. the most bytes the step held at once above
what was live before it (weights, optimizer state). Memory malloc'd outside torch's allocator
(oneDNN scratch, the Python heap) is not counted, for any variant. Gradients are set to None
before each step, so every variant allocates them inside the step.

Timing: the four variants are interleaved round by round (each round runs each variant once,
after a warm-up that includes compilation), and the median over rounds is reported; ratios
are against eager original and between variants of the same run.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import serfswap

Batch = dict[str, torch.Tensor]


def resnet18() -> tuple[nn.Module, Batch]:
    import timm

    return timm.create_model("resnet18", pretrained=False), {"x": torch.randn(8, 3, 224, 224)}


def bert4() -> tuple[nn.Module, Batch]:
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(num_hidden_layers=4))  # hidden 768, MLP 3072, GELU
    ids = torch.randint(1000, 30000, (8, 128))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


MODELS: dict[str, Callable[[], tuple[nn.Module, Batch]]] = {"resnet18": resnet18, "bert": bert4}


def _loss(out: Any) -> torch.Tensor:
    tensor = out if isinstance(out, torch.Tensor) else out[0]
    return tensor.float().square().mean()


def infer(model: Callable[..., Any], batch: Batch) -> None:
    with torch.no_grad():
        model(**batch)


def train_step(module: nn.Module, model: Callable[..., Any], batch: Batch) -> None:
    module.zero_grad(set_to_none=True)
    _loss(model(**batch)).backward()


def peak_bytes(fn: Callable[[], None]) -> int:
    """The most bytes allocated through torch's CPU allocator and alive at once during fn()."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.time_range.start, e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage
    )
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


def variants(name: str) -> dict[str, tuple[nn.Module, Callable[..., Any], Batch]]:
    torch.manual_seed(0)
    original, batch = MODELS[name]()
    serf = serfswap.convert(original)
    out = {}
    for label, module in (("original", original), ("Serf", serf)):
        out[f"eager {label}"] = (module, module, batch)
        twin = copy.deepcopy(module)
        out[f"compiled {label}"] = (twin, torch.compile(twin), batch)
    return out


def bench(name: str, rounds: int) -> None:
    runs = variants(name)
    infer_ms: dict[str, list[float]] = {k: [] for k in runs}
    train_ms: dict[str, list[float]] = {k: [] for k in runs}
    peak: dict[str, int] = {}
    compile_s: dict[str, float] = {}
    for label, (module, model, batch) in runs.items():
        start = time.perf_counter()
        module.eval()
        infer(model, batch)  # compiles the inference graph
        module.train()
        train_step(module, model, batch)  # compiles the training graphs
        compile_s[label] = time.perf_counter() - start
        peak[label] = peak_bytes(lambda m=module, f=model, b=batch: train_step(m, f, b))
    for _ in range(rounds):
        for label, (module, model, batch) in runs.items():
            module.eval()
            start = time.perf_counter()
            infer(model, batch)
            infer_ms[label].append((time.perf_counter() - start) * 1e3)
            module.train()
            start = time.perf_counter()
            train_step(module, model, batch)
            train_ms[label].append((time.perf_counter() - start) * 1e3)
    inf = {k: statistics.median(v) for k, v in infer_ms.items()}
    trn = {k: statistics.median(v) for k, v in train_ms.items()}
    base = "eager original"
    print(f"\n{name}: batch 8, {torch.get_num_threads()} threads, median of {rounds} rounds")
    print("| variant           | infer ms | / eager orig | train ms | / eager orig "
          "| train peak MiB | first call s |")  # fmt: skip
    print("|-------------------|----------|--------------|----------|--------------"
          "|----------------|--------------|")  # fmt: skip
    for label in runs:
        print(
            f"| {label:17s} | {inf[label]:8.1f} | {inf[label] / inf[base]:12.2f} "
            f"| {trn[label]:8.1f} | {trn[label] / trn[base]:12.2f} "
            f"| {peak[label] / 2**20:14.1f} | {compile_s[label]:12.1f} |"
        )
    cs, es, co = "compiled Serf", "eager Serf", "compiled original"
    print(
        f"compiled Serf / eager Serf: infer {inf[cs] / inf[es]:.2f}, train {trn[cs] / trn[es]:.2f}"
        f", train peak {peak[cs] / peak[es]:.2f}"
    )
    print(
        f"compiled Serf / compiled original: infer {inf[cs] / inf[co]:.2f}, "
        f"train {trn[cs] / trn[co]:.2f}, train peak {peak[cs] / peak[co]:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, serfswap {serfswap.__version__}")
    for name in args.models:
        bench(name, args.rounds)


if __name__ == "__main__":
    main()
