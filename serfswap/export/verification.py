"""An exported file checked against torch: onnxruntime (CPU) runs it on fresh inputs and every
output must match torch's within a tolerance that scales with the output's magnitude.
:func:`verify_onnx` is the public face; :func:`serfswap.export_onnx` runs :func:`compare` on each
file before it moves the file into place."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ExportError, ExportFailedError, ExportMismatchError, InvalidArgumentError
from ..io.paths import check_input_path
from ..modes import eval_mode
from ..names import ATTENTION_MASK
from ..options import TOLERANCE
from ..runtime.session import session
from .failures import ShapeMismatchError, short_ort
from .naming import leaves, named_inputs
from .switches import without_kv_cache


def feed(names: list[str], inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """onnxruntime's feed: by name when the file's inputs carry the names given (every file
    serfswap writes), else in order (a file exported with other input names)."""
    if all(name in inputs for name in names) and len(names) <= len(inputs):
        return {name: inputs[name].numpy() for name in names}
    if len(names) == len(inputs):
        return {name: t.numpy() for name, t in zip(names, inputs.values(), strict=True)}
    raise ExportError(f"the ONNX file takes inputs {names}; given {list(inputs)}")


def fresh_like(
    inputs: dict[str, torch.Tensor], grow: dict[int, int], seq_names: set[str]
) -> dict[str, torch.Tensor]:
    """New inputs with other values, ``grow[dim]`` more along dim 0 (batch) / dim 1 (sequence)."""
    fresh = {}
    for name, t in inputs.items():
        shape = list(t.shape)
        if shape:
            shape[0] += grow[0]
        if name in seq_names and len(shape) > 1:
            shape[1] += grow[1]
        if t.is_floating_point():
            fresh[name] = torch.randn(shape, dtype=t.dtype)
        elif name == ATTENTION_MASK:
            fresh[name] = torch.ones(shape, dtype=t.dtype)
        else:
            low, high = int(t.min()), int(t.max())
            fresh[name] = torch.randint(low, high + 1, shape, dtype=t.dtype)
    return fresh


def differences(
    names: list[str], got: list[Any], want: list[torch.Tensor], atol: float, rtol: float
) -> tuple[dict[str, float], dict[str, float]]:
    """The largest absolute and relative differences of each output, onnxruntime's (``got``)
    against torch's (``want``); ExportMismatchError when one is beyond the tolerance.

    The tolerance scales with each output's magnitude: element ``y`` of an output whose
    largest magnitude is ``S`` may differ by ``atol * max(S, 1) + rtol * |y|``. Rounding in
    float32 is relative to the size of the sums that made a value, not to the value itself:
    a logit near zero in a row of logits near 20 carries the error of the large ones. A real
    30-layer LLaMA differs by 5e-4 on logits of ~20 (2.5e-5 of the scale), which a fixed
    ``atol`` of 1e-4 refused; an exported graph that computes something else (Mish for Serf,
    a baked-in shape) differs by 1e-2 of the scale or more, which this still catches."""
    abs_diff, rel_diff, bad = {}, {}, []
    for name, ort_out, torch_out in zip(names, got, want, strict=True):
        expected = torch_out.float()
        actual = torch.from_numpy(ort_out).float()
        if actual.shape != expected.shape:
            raise ShapeMismatchError(
                f"output {name}: onnxruntime shape {tuple(actual.shape)}, "
                f"torch {tuple(expected.shape)} (a shape baked in at export?)"
            )
        if not bool(torch.isfinite(actual).all()):
            raise ExportMismatchError(
                f"onnxruntime's output {name} holds NaN or inf where torch's is finite"
            )
        if not expected.numel():
            abs_diff[name] = rel_diff[name] = 0.0
            continue
        diff = (actual - expected).abs()
        abs_diff[name] = diff.max().item()
        rel_diff[name] = (diff / expected.abs().clamp_min(1e-6)).max().item()
        scale = max(expected.abs().max().item(), 1.0)
        if not bool((diff <= atol * scale + rtol * expected.abs()).all()):
            bad.append(f"{name}: max abs diff {abs_diff[name]:.3g} on values up to {scale:.3g}")
    if bad:
        raise ExportMismatchError(
            f"onnxruntime differs from torch beyond atol={atol:g} (times each output's "
            f"largest magnitude, when above 1), rtol={rtol:g}: {'; '.join(bad)}"
        )
    return abs_diff, rel_diff


def compare(
    model: nn.Module,
    path: Path,
    inputs: dict[str, torch.Tensor],
    atol: float,
    rtol: float,
    *,
    positional: bool = False,
) -> tuple[dict[str, float], dict[str, float]]:
    """Run the file at ``path`` on ``inputs`` with onnxruntime (CPU) and ``model`` with torch
    (keywords, or ``positional``: an exported program's module takes its inputs in order); the
    largest differences of each output (:func:`differences`)."""
    # onnxruntime logs its own failures (a coloured line on stderr) before raising them: the
    # raised error is reported in one line of ours instead; --debug shows onnxruntime's log.
    quiet = not logging.getLogger("serfswap").isEnabledFor(logging.DEBUG)
    sess = session(path, "cpu", log_severity=4 if quiet else None)
    feeds = feed([i.name for i in sess.get_inputs()], inputs)
    try:
        got = sess.run(None, feeds)
    except Exception as exc:  # onnxruntime's Fail, InvalidArgument, RuntimeException...
        sizes = ", ".join(f"{k} {'x'.join(map(str, v.shape))}" for k, v in inputs.items())
        raise ExportFailedError(
            f"onnxruntime cannot run the exported graph at {sizes}: {short_ort(exc)}"
        ) from None
    with torch.no_grad():
        want = leaves(model(*inputs.values()) if positional else model(**inputs))
    names = [o.name for o in sess.get_outputs()]
    if len(got) != len(want):
        raise ExportMismatchError(f"onnxruntime gave {len(got)} outputs, torch {len(want)}")
    for name, torch_out in zip(names, want, strict=True):
        if not bool(torch.isfinite(torch_out).all()):
            raise ExportError(
                f"torch's output {name} holds NaN or inf on the verification inputs: the model "
                "itself is broken (non-finite weights?); refusing to write it"
            )
    return differences(names, got, want, atol, rtol)


@dataclass(frozen=True)
class Verification:
    """What :func:`verify_onnx` measured: the largest differences per output, by ONNX name."""

    max_abs_diff: dict[str, float]
    max_rel_diff: dict[str, float]

    def __str__(self) -> str:
        return "\n".join(
            f"{name}: max abs diff {diff:.2e}, max rel diff {self.max_rel_diff[name]:.2e}"
            for name, diff in self.max_abs_diff.items()
        )


def verify_onnx(
    model: nn.Module | torch.export.ExportedProgram,
    path: str | os.PathLike[str],
    inputs: Any,
    *,
    atol: float = TOLERANCE["fp32"][0],
    rtol: float = TOLERANCE["fp32"][1],
) -> Verification:
    """Run the ONNX file at ``path`` with onnxruntime (CPU) on ``inputs`` and compare every
    output with ``model``'s, as :func:`export_onnx` does before it writes: for files you
    exported yourself (``torch.onnx.export``, Optimum), or to check one again on your data.

    ``inputs``: a tensor, a tuple (positional) or a dict (keyword) of tensors; fed to the file
    by name when its inputs carry those names, else in order. The model runs in eval mode (each
    module gets its mode back after) and without its KV cache, as ``export_onnx`` exports it.
    Use inputs of another batch size than the export's to catch baked-in shapes.

    Raises :class:`ExportMismatchError` (an AssertionError) when an output differs beyond
    ``atol`` / ``rtol`` or has another shape, :class:`ExportFailedError` when onnxruntime cannot
    run the file on these inputs, :class:`ExportError` when torch's own output is not finite.

    >>> serfswap.verify_onnx(model, "model.onnx", torch.randn(3, 3, 224, 224))  # doctest: +SKIP
    """
    if isinstance(model, torch.export.ExportedProgram):
        module, mode = model.module(), contextlib.nullcontext()  # its graph fixed the modes
    elif isinstance(model, nn.Module):
        module, mode = model, eval_mode(model)
    else:
        raise InvalidArgumentError(
            f"verify_onnx() takes an nn.Module or a torch.export program, got {model!r:.80}"
        )
    path = check_input_path(path)
    positional = not isinstance(inputs, dict)
    named = named_inputs(module, inputs)
    with without_kv_cache(module), mode:
        abs_diff, rel_diff = compare(module, path, named, atol, rtol, positional=positional)
    return Verification(abs_diff, rel_diff)
