"""``export_onnx(..., quantize="int8")``: the verified fp32 export, dynamically quantised with
onnxruntime (int8 weights, activations quantised at run time), measured against the fp32 file
in the task's own measure before it is written.

Why per-channel weights by default: onnxruntime's per-tensor default cost a recovered Serf
all-MiniLM-L6-v2 much more accuracy than the original (min / mean embedding cosine 0.878 /
0.914 against 0.946 / 0.966), while per-channel weights gave 0.990 / 0.9935 (original 0.988 /
0.994) at the same speed (issue #30). ``int8-per-tensor`` stays for comparison.

What is quantised: onnxruntime's dynamic set for the graph's ops (MatMul, and Conv, Gather,
Attention where present). The measure, on the verification inputs:

* ``last_hidden_state`` (feature extraction): the cosine of the mask-averaged embeddings
  (``sentence_embedding``, a sentence-transformers export's, as it is);
* a 2-D first output (a classifier's logits): top-1 agreement;
* anything else (a language model's logits): top-1 agreement over the last axis and the largest
  difference relative to the output's scale.

The numbers are printed, not judged: random inputs are no data set, and what is acceptable is
the user's call. ``serfswap export --data`` (static quantisation with calibration) is not built.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExportFailedError, InvalidChoiceError
from ..options import QUANTIZE


def check_quantize(quantize: str | None) -> None:
    if quantize is not None and quantize not in QUANTIZE:
        message = f"quantize={quantize!r}: use one of {list(QUANTIZE)}"
        raise InvalidChoiceError(message, option="quantize")


@dataclass
class Quantized:
    """What quantisation wrote and how close it stays to the fp32 export."""

    mode: str
    measure: str  # "embedding cosine", "top-1 agreement" or "logits"
    values: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    fp32_bytes: int = 0

    def __str__(self) -> str:
        weights = "per-channel" if QUANTIZE[self.mode] else "per-tensor"
        shown = ", ".join(f"{k} {v:.4f}" for k, v in self.values.items())
        return (
            f"  int8 (dynamic, {weights} weights; fp32 was {self.fp32_bytes / 1e6:.1f} MB): "
            f"{self.measure} against fp32 on {self.samples} verification samples: {shown}"
        )


def _feed(sess: Any, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """onnxruntime's feed from torch tensors: by name where the names match, else in order."""
    names = [i.name for i in sess.get_inputs()]
    arrays = {k: v.numpy() for k, v in inputs.items()}
    if all(name in arrays for name in names):
        return {name: arrays[name] for name in names}
    return dict(zip(names, arrays.values(), strict=False))


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two 2-D arrays."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, 1e-12)


def _pooled(hidden: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Mean of the token embeddings over the real tokens (a sentence embedding)."""
    if mask is None:
        return hidden.mean(axis=1)
    weights = mask.astype(hidden.dtype)[..., None]
    return (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1.0)


def measure(names: list[str], fp32: list[Any], int8: list[Any], masks: list[Any]) -> Quantized:
    """The task's measure over every verification set (lists of each set's outputs)."""
    if "sentence_embedding" in names:  # a sentence-transformers export (Optimum's), pooled
        at = names.index("sentence_embedding")
        cos = np.concatenate([_cosine(f[at], q[at]) for f, q in zip(fp32, int8, strict=True)])
        values = {"min": float(cos.min()), "mean": float(cos.mean())}
        return Quantized("", "embedding cosine", values, cos.size)
    if "last_hidden_state" in names:
        at = names.index("last_hidden_state")
        cos = np.concatenate([
            _cosine(_pooled(f[at], m), _pooled(q[at], m))
            for f, q, m in zip(fp32, int8, masks, strict=True)
        ])  # fmt: skip
        values = {"min": float(cos.min()), "mean": float(cos.mean())}
        return Quantized("", "embedding cosine", values, cos.size)
    pairs = zip(fp32, int8, strict=True)
    first = [(np.asarray(f[0], np.float64), np.asarray(q[0], np.float64)) for f, q in pairs]
    agree = np.concatenate([(f.argmax(-1) == q.argmax(-1)).reshape(-1) for f, q in first])
    values = {"top-1 agreement": float(agree.mean())}
    if first[0][0].ndim == 2:
        return Quantized("", "top-1 agreement", values, agree.size)
    scale = max(max(float(np.abs(f).max()) for f, _ in first), 1.0)
    values["max abs diff / scale"] = max(float(np.abs(f - q).max()) for f, q in first) / scale
    return Quantized("", "logits", values, agree.size)


def _no_preprocessing_hint(record: logging.LogRecord) -> bool:
    """The quantiser warns on the root logger that pre-processing (its symbolic shape inference
    and graph optimisation) could help; serfswap's graphs are already exported and verified,
    and the user cannot act on the hint, so it is dropped."""
    return "pre-processing" not in record.getMessage()


def quantize_file(
    source: Path, destination: Path, mode: str = "int8", *, external_data: bool = False
) -> None:
    """onnxruntime's dynamic quantisation of the ONNX file ``source`` (int8 weights, per channel
    for ``"int8"``) written at ``destination``, without the intermediate shape annotations the
    quantiser adds (:mod:`serfswap.onnx_ops.value_info` says why). Used by the export and by
    ``benchmarks/bench_ort.py`` for files exported elsewhere."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from ..onnx_ops.value_info import strip_value_info_file

    check_quantize(mode)
    root = logging.getLogger()
    root.addFilter(_no_preprocessing_hint)
    try:
        quantize_dynamic(
            source, destination, per_channel=QUANTIZE[mode], weight_type=QuantType.QInt8,
            use_external_data_format=external_data,
            # onnxruntime's fused ops (an -O2 file's) have no type from shape inference
            extra_options={"DefaultTensorType": 1},  # onnx.TensorProto.FLOAT
        )  # fmt: skip
    except Exception as exc:  # onnxruntime's quantiser raises plain exceptions of many kinds
        raise ExportFailedError(f"onnxruntime's quantize_dynamic failed: {exc}") from None
    finally:
        root.removeFilter(_no_preprocessing_hint)
    strip_value_info_file(destination)  # the quantiser writes its shape inference back


def quantize_staged(staged: Path, mode: str, inputs: list[dict[str, Any]], report: Any) -> None:
    """Replace the verified fp32 file ``staged`` (in its staging folder) by its dynamic int8
    quantisation, measured against it on ``inputs`` (the verification sets); sets
    ``report.quantization``, ``size_bytes`` and ``external_data``."""
    from ..runtime import session

    # The fp32 file and any side file move to a folder of their own: the int8 file takes the
    # names, and the staging folder's files are what moves into place.
    fp32_dir = staged.parent / "fp32"
    fp32_dir.mkdir()
    for file in list(staged.parent.iterdir()):
        if file != fp32_dir:
            file.rename(fp32_dir / file.name)
    fp32 = fp32_dir / staged.name
    fp32_bytes = sum(f.stat().st_size for f in fp32_dir.iterdir())
    quantize_file(fp32, staged, mode, external_data=report.external_data is not None)
    sessions = [session(path, "cpu", log_severity=4) for path in (fp32, staged)]
    names = [o.name for o in sessions[0].get_outputs()]
    runs = [[s.run(None, _feed(s, x)) for x in inputs] for s in sessions]
    masks = [x["attention_mask"].numpy() if "attention_mask" in x else None for x in inputs]
    result = measure(names, runs[0], runs[1], masks)
    result.mode, result.fp32_bytes = mode, fp32_bytes
    shutil.rmtree(fp32_dir)
    report.quantization = result
    report.size_bytes = sum(f.stat().st_size for f in staged.parent.iterdir())


__all__ = ["Quantized", "check_quantize", "measure", "quantize_file", "quantize_staged"]
