"""Time of plan / convert / revert on large models, against one copy.deepcopy of the same model.

Target: ``convert(model, inplace=True)`` in under 5% of a deepcopy's time. "cold" is the first
call in the process (it reads and parses the source of each model class once, for functional
call sites); "warm" the median of the calls after it (each convert is undone by a revert).
The model is built once per process, so each model's cold figures are measured in a process
where the other model's classes (and torch's) have already been seen.

    python benchmarks/bench_convert.py                # ViT-L/16 (timm) and BERT-large (HF)
    python benchmarks/bench_convert.py --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import serfswap


def vit_large() -> nn.Module:
    import timm

    return timm.create_model("vit_large_patch16_224", pretrained=False)


def bert_large() -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
    )
    return BertModel(config)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "timm vit_large_patch16_224": vit_large,
    "HF BERT-large (24 layers)": bert_large,
}


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(name: str, build: Callable[[], nn.Module], rounds: int) -> None:
    torch.manual_seed(0)
    model = build()
    params = sum(p.numel() for p in model.parameters())
    deepcopy_s = statistics.median(timed(lambda: copy.deepcopy(model)) for _ in range(3))
    results: dict[str, list[float]] = {"convert(inplace=True)": [], "revert": [], "plan": []}
    for _ in range(rounds + 1):  # the first round is the cold one: convert comes first
        start = time.perf_counter()
        converted = serfswap.convert(model, inplace=True)
        results["convert(inplace=True)"].append(time.perf_counter() - start)
        start = time.perf_counter()
        model = serfswap.revert(converted)
        results["revert"].append(time.perf_counter() - start)
        start = time.perf_counter()
        serfswap.plan(model)
        results["plan"].append(time.perf_counter() - start)
    sites = len(serfswap.plan(model).converted)
    print(
        f"\n{name}: {params / 1e6:.0f}M parameters, {sites} activations, "
        f"deepcopy {deepcopy_s * 1e3:.0f} ms (median of 3)"
    )
    print("| step | cold ms | cold / deepcopy | warm ms | warm / deepcopy |")
    print("|---|---|---|---|---|")
    for step, times in results.items():
        warm = statistics.median(times[1:])
        cold = times[0]
        print(
            f"| {step} | {cold * 1e3:.1f} | {cold / deepcopy_s:.2%} | {warm * 1e3:.1f} | "
            f"{warm / deepcopy_s:.2%} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(
        f"serfswap {serfswap.__version__}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    for name, build in MODELS.items():
        bench(name, build, args.rounds)


if __name__ == "__main__":
    main()
