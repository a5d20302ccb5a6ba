"""``export_onnx(..., optimize=True)``: the checked export run through onnxruntime's transformer
optimizer (:mod:`serfswap.onnx_ops.optimize`) in its staging folder, before verification.

Three checks, any failure leaving nothing written: the optimized file holds as many Serf
decompositions as the export (a fusion that swallowed part of one would change the function);
it computes what the unoptimized file computes on inputs with padded attention masks (padding
at the end of one row, at the start of another: the mask rewrite and the fused ``Attention``'s
mask handling are checked where they matter, which all-ones masks would not show); and then the
export's own verification against torch runs on the optimized file.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx

from ..errors import ExportError, ExportMismatchError
from ..onnx_ops.compare import compare_files
from ..onnx_ops.graph import check_graph
from ..onnx_ops.optimize import Optimized, optimize_file, settings_for
from .failures import AttemptFailed
from .request import Request


def optimize_staged(req: Request, staged: Path, serf_nodes: int) -> Optimized:
    """Optimize the inspected file ``staged`` in place, checked against its unoptimized copy
    (kept in a folder of the staging folder meanwhile, then removed)."""
    before = staged.parent / "unoptimized"
    before.mkdir()
    try:
        for file in list(staged.parent.iterdir()):
            if file.is_file():
                shutil.copy2(file, before / file.name)
        model_type, heads, hidden = settings_for(req.model)
        done = optimize_file(staged, model_type, heads, hidden)
        kept = check_graph(onnx.load(str(staged), load_external_data=False), str(staged.parent))
        if kept.serf_total != serf_nodes:
            raise ExportError(
                f"onnxruntime's optimizer changed the Serf decompositions ({serf_nodes} before, "
                f"{kept.serf_total} after): export without optimize"
            )
        try:
            compare_files(before / staged.name, staged, atol=req.atol, rtol=req.rtol, padded=True)
        except ExportMismatchError as exc:
            raise AttemptFailed(f"the optimized file: {exc}", exc) from None
    finally:
        shutil.rmtree(before)
    return done


__all__ = ["optimize_staged"]
