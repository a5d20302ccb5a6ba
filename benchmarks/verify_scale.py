"""How far onnxruntime and torch differ on a deep decoder at trained magnitudes (issue 23).

SmolLM-135M's shape (30 LLaMA layers, width 576, 9 query / 3 key-value heads; vocabulary cut
to 2048) with its weights scaled by --scales, so that the logits reach the magnitudes of a
trained model. Each model is exported with the KV cache (``text-generation-with-past``) with
verification off, then compared with ``serfswap.verify_onnx``'s rule at atol = rtol = 0 to
read the raw differences, at the export's two verification past lengths. Printed per scale:
the largest |logit|, the largest difference, that difference over the scale, and whether the
old fixed rule (|d| <= 1e-4 + 1e-4 |y|) and the scaled rule (|d| <= 1e-4 max(S, 1) + 1e-4 |y|)
accept it.

    python benchmarks/verify_scale.py [--scales 1 4 8] [--layers 30] [--convert]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' zoo

from tests.zoo.deep import smollm_shaped


def measure(model: torch.nn.Module, path: Path) -> tuple[float, float, bool, bool]:
    """The largest |logit| and difference over the verification inputs; the two rules."""
    import onnxruntime as ort

    from serfswap.export.decoder import verification_inputs, with_past
    from serfswap.export.naming import leaves
    from serfswap.export.switches import without_kv_cache
    from serfswap.export.verification import feed

    decoder = with_past(model)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    scale = diff_max = 0.0
    old_ok = new_ok = True
    with without_kv_cache(model), torch.no_grad():
        for inputs in verification_inputs(decoder):
            got = sess.run(None, feed(names, inputs))
            want = leaves(decoder(**inputs))
            for ort_out, torch_out in zip(got, want, strict=True):
                expected = torch_out.float()
                diff = (torch.from_numpy(ort_out).float() - expected).abs()
                size = max(expected.abs().max().item(), 1.0)
                old_ok &= bool((diff <= 1e-4 + 1e-4 * expected.abs()).all())
                new_ok &= bool((diff <= 1e-4 * size + 1e-4 * expected.abs()).all())
            logits = want[0].abs().max().item()
            scale = max(scale, logits)
            diff_max = max(diff_max, (torch.from_numpy(got[0]) - want[0]).abs().max().item())
    return scale, diff_max, old_ok, new_ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--convert", action="store_true", help="convert to Serf first")
    args = parser.parse_args()
    import serfswap

    print(f"{'scale':>5} {'max|logit|':>10} {'max diff':>9} {'diff/scale':>10} "
          f"{'fixed 1e-4':>10} {'scaled':>7} {'export s':>8}")  # fmt: skip
    for scale in args.scales:
        model = smollm_shaped(args.layers, scale)
        if args.convert:
            model = serfswap.convert(model)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.onnx"
            start = time.perf_counter()
            serfswap.export_onnx(model, path, task="text-generation-with-past", verify=False)
            seconds = time.perf_counter() - start
            logits, diff, old_ok, new_ok = measure(model, path)
        print(f"{scale:>5g} {logits:>10.3g} {diff:>9.2e} {diff / max(logits, 1):>10.2e} "
              f"{'pass' if old_ok else 'FAIL':>10} {'pass' if new_ok else 'FAIL':>7} "
              f"{seconds:>8.0f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
