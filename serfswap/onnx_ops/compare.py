"""Run two ONNX files on onnxruntime's CPU on the same inputs and compare their outputs: how a
rewritten file (:mod:`serfswap.onnx_ops.retarget`) is checked against the one it came from,
where no torch model is at hand.

Inputs are made from the file's own input declarations: symbolic dimensions get a size (batch
2, anything else 7, not the sizes an exporter traced with, so baked-in shapes show), floats are
standard normal, ``attention_mask`` is ones, other integers are 0 or 1 (valid token ids and
type ids for any vocabulary).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExportFailedError, ExportMismatchError
from ..options import TOLERANCE

_BATCH, _OTHER = 2, 7


def random_feed(sess: Any, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for every input of the onnxruntime session ``sess``, from its declarations."""
    rng = np.random.default_rng(seed)
    feed = {}
    for value in sess.get_inputs():
        shape = [
            d if isinstance(d, int) else (_BATCH if i == 0 else _OTHER)
            for i, d in enumerate(value.shape)
        ]
        kind = value.type.removeprefix("tensor(").removesuffix(")")
        dtype = {"float": np.float32, "float16": np.float16, "double": np.float64}.get(kind)
        if dtype is not None:
            feed[value.name] = rng.standard_normal(shape).astype(dtype)
        elif kind == "bool":
            feed[value.name] = np.ones(shape, dtype=bool)
        else:
            ints = np.dtype(kind)
            if "mask" in value.name:
                feed[value.name] = np.ones(shape, dtype=ints)
            else:
                feed[value.name] = rng.integers(0, 2, shape).astype(ints)
    return feed


def _session(path: Path) -> Any:
    from ..runtime import session

    try:
        return session(path, "cpu", log_severity=4)
    except Exception as exc:  # onnxruntime's own kinds
        raise ExportFailedError(f"onnxruntime cannot load {path.name}: {exc}") from None


def compare_files(
    reference: Path,
    candidate: Path,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    padded: bool = False,
) -> dict[str, float]:
    """The largest absolute difference of each output of ``candidate`` against ``reference``
    on the same random inputs; :class:`ExportMismatchError` beyond the tolerance (fp32's by
    default: ``atol`` times each output's largest magnitude when above 1, plus ``rtol``).
    ``padded``: an ``attention_mask`` with padding at the end of one row and at the start of
    another (:func:`serfswap.onnx_ops.attention_mask.padded_feed`) instead of ones."""
    default_atol, default_rtol = TOLERANCE["fp32"]
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    want_sess, got_sess = _session(reference), _session(candidate)
    feed = random_feed(want_sess)
    if padded:
        from .attention_mask import padded_feed

        feed = padded_feed(feed)
    try:
        want = want_sess.run(None, feed)
        got = got_sess.run(None, feed)
    except Exception as exc:
        message = f"onnxruntime cannot run the files on random inputs: {exc}"
        raise ExportFailedError(message) from None
    names = [o.name for o in want_sess.get_outputs()]
    if [o.name for o in got_sess.get_outputs()] != names:
        raise ExportMismatchError("the rewritten file's outputs are not the original's")
    diffs, bad = {}, []
    for name, w, g in zip(names, want, got, strict=True):
        w64, g64 = np.asarray(w, np.float64), np.asarray(g, np.float64)
        if w64.shape != g64.shape:
            raise ExportMismatchError(f"output {name}: shape {g64.shape}, want {w64.shape}")
        if not w64.size:
            diffs[name] = 0.0
            continue
        finite = np.isfinite(w64)
        if not np.array_equal(finite, np.isfinite(g64)):
            raise ExportMismatchError(f"output {name}: NaN or inf where the original has none")
        diff = np.abs(g64 - w64)[finite]
        diffs[name] = float(diff.max(initial=0.0))
        scale = max(float(np.abs(w64[finite]).max(initial=0.0)), 1.0)
        if not bool((diff <= atol * scale + rtol * np.abs(w64[finite])).all()):
            bad.append(f"{name}: max abs diff {diffs[name]:.3g} on values up to {scale:.3g}")
    if bad:
        raise ExportMismatchError(f"the rewritten file differs: {'; '.join(bad)}")
    return diffs


__all__ = ["compare_files", "random_feed"]
