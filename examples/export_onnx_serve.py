"""Export a Serf model to ONNX, then serve it with onnxruntime: check it against torch, time it.

    python examples/export_onnx_serve.py                   # resnet18 at 224x224
    python examples/export_onnx_serve.py --model convnext_atto --decomposition softplus
    python examples/export_onnx_serve.py --quick           # tiny model, 64x64, a few seconds

``serfswap.export_onnx`` writes every Serf as standard ONNX ops and verifies the file with
onnxruntime against torch (on a batch size the export did not see) before it moves it into
place. ``serfswap.onnx_ops.session`` opens it on CUDA when onnxruntime-gpu sees a GPU, else on
the CPU. The decomposition defaults to what suits that device: ``softplus`` (Softplus -> Erf ->
Mul, exact and fast where Softplus has a fast kernel) on CUDA, ``exp-log`` on the CPU, where
onnxruntime's Softplus kernel is scalar.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import timm
import torch

import serfswap
import serfswap.onnx_ops


def median_ms(fn: Callable[[], object], runs: int) -> float:
    """Median wall time of ``fn`` in milliseconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", help="a timm model name")
    parser.add_argument("--out", type=Path, help="the .onnx file (default: a temporary folder)")
    parser.add_argument("--decomposition", choices=list(serfswap.onnx_ops.DECOMPOSITIONS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="tiny model, 64x64 inputs")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.batch, args.runs = "test_resnet", 2, 3
    on_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    decomposition = args.decomposition or ("softplus" if on_cuda else "exp-log")
    torch.manual_seed(0)

    serf_model = serfswap.convert(timm.create_model(args.model, pretrained=False)).eval()
    # Inputs are inferred for timm and HuggingFace models (timm: pretrained_cfg["input_size"]),
    # with a dynamic batch. In --quick mode a smaller example input: its height and width are
    # then fixed in the graph, only the batch stays dynamic.
    example = torch.randn(1, 3, 64, 64) if args.quick else None

    with tempfile.TemporaryDirectory() as tmp:
        path = args.out or Path(tmp) / f"{args.model}-serf.onnx"
        report = serfswap.export_onnx(serf_model, path, example, decomposition=decomposition)
        print(report)
        # Every Serf became the decomposition, and no ReLU / GELU / SiLU... was left behind.
        assert report.verified and report.serf_nodes > 0 and not report.leftovers

        sess = serfswap.onnx_ops.session(path)  # device="auto"; "cpu" or "cuda" to insist
        print(f"onnxruntime {onnxruntime.__version__} on {sess.get_providers()[0]}")
        (feed,) = sess.get_inputs()  # timm models take one image tensor, named "x"
        size = (3, 64, 64) if args.quick else serf_model.pretrained_cfg["input_size"]
        images = np.random.default_rng(0).standard_normal((args.batch, *size), dtype=np.float32)

        (logits,) = sess.run(None, {feed.name: images})
        with torch.no_grad():
            expected = serf_model(torch.from_numpy(images)).numpy()
        diff = np.abs(logits - expected).max()
        print(f"batch {args.batch}: max abs diff onnxruntime vs torch {diff:.2e}")
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)

        ort_ms = median_ms(lambda: sess.run(None, {feed.name: images}), args.runs)
        with torch.no_grad():
            x = torch.from_numpy(images)
            torch_ms = median_ms(lambda: serf_model(x), args.runs)
        print(f"median of {args.runs} runs: onnxruntime {ort_ms:.1f} ms, torch {torch_ms:.1f} ms")


if __name__ == "__main__":
    main()
