"""What :func:`serfswap.export_onnx` wrote and checked, as a report object with a readable
``__str__`` (the ``serfswap export`` command prints it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..names import summarise
from ..onnx_ops.decompositions import PATTERNS

if TYPE_CHECKING:
    from ..onnx_ops.optimize import Optimized
    from .quantize import Quantized


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and what it checked."""

    path: Path
    decomposition: str
    opset: int
    dtype: str
    inputs: dict[str, tuple[int, ...]]
    serf_nodes: int
    leftovers: dict[str, int]
    converted_activations: int
    size_bytes: int
    external_data: Path | None = None
    verified: bool = False
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    max_rel_diff: dict[str, float] = field(default_factory=dict)
    functions: bool = False
    outputs: list[str] = field(default_factory=list)
    dynamic_axes: dict[str, list[str]] = field(default_factory=dict)
    fallback: str | None = None  # why the shapes are less dynamic than asked, when they are
    exporter: str = "dynamo"  # the torch exporter that wrote the file
    exporter_note: str | None = None  # why not the dynamo exporter; torch's deprecation notice
    left_at_run_time: int = 0  # activations the conversion was to replace that still run
    target: str | None = None  # where the decomposition was chosen to run (target=)
    quantization: Quantized | None = None  # quantize=: its accuracy against fp32
    optimization: Optimized | None = None  # optimize=: what onnxruntime's optimizer fused

    def __str__(self) -> str:
        lines = [
            f"wrote {self.path} ({self.size_bytes / 1e6:.1f} MB"
            + (f", weights in {self.external_data.name}" if self.external_data else "")
            + f"), opset {self.opset}, {self.dtype}",
            f"  Serf: {self.serf_nodes} as {self.decomposition} "
            f"({' -> '.join(PATTERNS[self.decomposition])})"
            + (" in calls of the local function serfswap.Serf" if self.functions else "")
            + (f" (the faster on {self.target})" if self.target else "")
            + "; "
            + (
                "original activations left: "
                + ", ".join(f"{k} x{v}" for k, v in self.leftovers.items())
                if self.leftovers
                else "no original activation left"
            ),
            f"  exporter: {self.exporter}"
            + (f" ({self.exporter_note})" if self.exporter_note else ""),
            # a KV cache's 60 names in one entry each: past_key_values.{0..29}.key/value [...]
            "  inputs: " + ", ".join(summarise((k, str(list(v))) for k, v in self.inputs.items())),
            "  outputs: " + ", ".join(summarise((name, "") for name in self.outputs)),
            "  dynamic axes: "
            + (
                ", ".join(
                    summarise(((k, f"[{', '.join(v)}]") for k, v in self.dynamic_axes.items()), "")
                )
                or "none (static shapes)"
            ),
        ]
        if self.left_at_run_time:
            lines.append(
                f"  PARTIAL conversion: {self.left_at_run_time} activations that were to be "
                "converted still run (the model's serfswap_report lists them as left)"
            )
        if self.fallback:
            lines.append(f"  shapes: {self.fallback}")
        if self.optimization is not None:
            lines.append(str(self.optimization))
        if self.quantization is not None:
            lines.append(str(self.quantization))
        if self.verified:
            worst = max(self.max_abs_diff.values(), default=0.0)
            lines.append(f"  verified with onnxruntime on fresh inputs: max abs diff {worst:.2e}")
        else:
            lines.append("  not verified (verify=False)")
        return "\n".join(lines)
