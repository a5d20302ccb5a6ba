"""torch -> ONNX with every Serf as standard ops, checked against torch before it is written.

Steps: infer example inputs when none are given (timm: ``pretrained_cfg["input_size"]``;
transformers: from the config and ``main_input_name``); export with the dynamo exporter, mapping
``serfswap::serf`` to the chosen decomposition; record serfswap's version, the decomposition and
the conversion counts in ``metadata_props``; ``onnx.checker`` (full check); count the Serf
decompositions and leftover activations; run onnxruntime on *fresh* inputs with another batch
size (and sequence length) than the export saw, so baked-in shapes fail here and not in
production; only then move the file into place. Everything is written in a temporary folder
beside the target, so a failed export leaves neither a partial nor a stale ``out.onnx``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .convert import REPORT_ATTR, convert
from .errors import SerfswapError
from .io import check_output_path
from .modes import eval_mode
from .serf import keep_custom_op

_TWO_GB = 2 * 1024**3
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# Default tolerances of the verification, per export dtype: measured on the zoo, with margin.
TOLERANCE = {"fp32": (1e-4, 1e-4), "fp16": (2e-2, 2e-2)}  # (atol, rtol)


class ExportError(SerfswapError, ValueError):
    """The export cannot be made as asked: bad option, missing inputs, unwritable target."""

    exit_code = 2


class ExportMismatchError(SerfswapError, AssertionError):
    """onnxruntime and torch disagree beyond the tolerance; nothing was written."""


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

    def __str__(self) -> str:
        lines = [
            f"wrote {self.path} ({self.size_bytes / 1e6:.1f} MB"
            + (f", weights in {self.external_data.name}" if self.external_data else "")
            + f"), opset {self.opset}, {self.dtype}",
            f"  Serf: {self.serf_nodes} as {self.decomposition} "
            f"({' -> '.join(_pattern(self.decomposition))})"
            + (" in calls of the local function serfswap.Serf" if self.functions else "")
            + "; "
            + (
                "original activations left: "
                + ", ".join(f"{k} x{v}" for k, v in self.leftovers.items())
                if self.leftovers
                else "no original activation left"
            ),
            "  inputs: " + ", ".join(f"{k} {list(v)}" for k, v in self.inputs.items()),
        ]
        if self.verified:
            worst = max(self.max_abs_diff.values(), default=0.0)
            lines.append(f"  verified with onnxruntime on fresh inputs: max abs diff {worst:.2e}")
        else:
            lines.append("  not verified (verify=False)")
        return "\n".join(lines)


def _fold_into_functions(path: Path) -> None:
    """Rewrite the ONNX file at ``path`` with every Serf as a ``serfswap.Serf`` function call.

    The weights stay where they are: a side file is referenced, not read, except for the
    one-element constant that moves into the function body.
    """
    import onnx

    from .onnx_ops.functions import fold_into_functions

    model = onnx.load(str(path), load_external_data=False)
    count = fold_into_functions(model, str(path.parent))
    model.metadata_props.add(key="serfswap.functions", value=str(count))
    onnx.save(model, str(path))


def _pattern(decomposition: str) -> tuple[str, ...]:
    from .onnx_ops import PATTERNS

    return PATTERNS[decomposition]


# Example inputs --------------------------------------------------------------------------------


def _accepts(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def example_inputs_for(
    model: nn.Module, *, batch: int = 2, seq: int = 8
) -> dict[str, torch.Tensor]:
    """Inputs a timm or transformers model can run on, from its own configuration.

    Raises ExportError for a plain module: its inputs cannot be guessed.
    """
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and "input_size" in cfg:  # timm
        return {"x": torch.randn(batch, *cfg["input_size"])}
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", None)
    if config is None or main is None:
        raise ExportError(
            f"cannot infer example inputs for a {type(model).__name__}: pass example_inputs "
            "(a tensor, a tuple of tensors or a dict of keyword tensors)"
        )
    vision = getattr(config, "vision_config", config)
    inputs: dict[str, torch.Tensor] = {}
    vocab = getattr(getattr(config, "text_config", config), "vocab_size", None) or 100
    if main == "input_ids" or (_accepts(model, "input_ids") and main != "pixel_values"):
        inputs["input_ids"] = torch.randint(3, min(vocab, 1000), (batch, seq))
        if _accepts(model, "attention_mask"):
            inputs["attention_mask"] = torch.ones(batch, seq, dtype=torch.long)
    if main == "pixel_values" or (_accepts(model, "pixel_values") and "input_ids" in inputs):
        size = getattr(vision, "image_size", 224)
        height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
        channels = getattr(vision, "num_channels", 3)
        inputs["pixel_values"] = torch.randn(batch, channels, height, width)
    if main == "input_values":
        inputs["input_values"] = torch.randn(batch, 16000)
    if main == "input_features":
        frames = 2 * getattr(config, "max_source_positions", 1500)
        inputs["input_features"] = torch.randn(batch, config.num_mel_bins, frames)
    if getattr(config, "is_encoder_decoder", False) and _accepts(model, "decoder_input_ids"):
        start = getattr(config, "decoder_start_token_id", None) or 0
        inputs["decoder_input_ids"] = torch.full((batch, max(seq // 2, 2)), start)
    if not inputs:
        raise ExportError(
            f"cannot infer example inputs for main input {main!r}: pass example_inputs"
        )
    return inputs


def _as_kwargs(model: nn.Module, example_inputs: Any) -> dict[str, torch.Tensor]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, dict):
        return dict(example_inputs)
    if isinstance(example_inputs, list | tuple):
        names = [
            p.name
            for p in inspect.signature(model.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if len(names) < len(example_inputs):
            raise ExportError(
                f"{len(example_inputs)} example inputs for forward({', '.join(names)})"
            )
        return dict(zip(names, example_inputs, strict=False))
    raise ExportError(
        f"example_inputs must be a tensor, a tuple or a dict, not {type(example_inputs).__name__}"
    )


SEQUENCE_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids",
                   "decoder_input_ids", "decoder_attention_mask")  # fmt: skip


def _sequence_inputs(inputs: dict[str, torch.Tensor]) -> set[str]:
    """Inputs whose dim 1 is the sequence, by HuggingFace's names: dynamic with the batch,
    whether the inputs were inferred or given (a tokenizer's output is the usual case)."""
    return {k for k in inputs if k in SEQUENCE_INPUTS}


def _fresh_like(
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
        elif name == "attention_mask":
            fresh[name] = torch.ones(shape, dtype=t.dtype)
        else:
            low, high = int(t.min()), int(t.max())
            fresh[name] = torch.randint(low, high + 1, shape, dtype=t.dtype)
    return fresh


def _dynamic_shapes(inputs: dict[str, torch.Tensor], seq_names: set[str]) -> dict[str, Any]:
    auto = torch.export.Dim.AUTO
    shapes: dict[str, Any] = {}
    for name, t in inputs.items():
        dims = {0: auto} if t.dim() else {}
        if name in seq_names and t.dim() > 1:
            dims[1] = auto
        shapes[name] = dims
    return shapes


# Verification ------------------------------------------------------------------------------------


def _leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _compare(
    model: nn.Module,
    path: Path,
    inputs: dict[str, torch.Tensor],
    atol: float,
    rtol: float,
    *,
    positional: bool = False,
) -> tuple[dict[str, float], dict[str, float]]:
    from .onnx_ops import session

    sess = session(path, "cpu")
    feed_names = [i.name for i in sess.get_inputs()]
    feed = {name: inputs[name].numpy() for name in feed_names}
    got = sess.run(None, feed)
    with torch.no_grad():
        want = _leaves(model(*inputs.values()) if positional else model(**inputs))
    names = [o.name for o in sess.get_outputs()]
    if len(got) != len(want):
        raise ExportMismatchError(f"onnxruntime gave {len(got)} outputs, torch {len(want)}")
    abs_diff, rel_diff, bad = {}, {}, []
    for name, ort_out, torch_out in zip(names, got, want, strict=True):
        expected = torch_out.float()
        actual = torch.from_numpy(ort_out).float()
        if actual.shape != expected.shape:
            raise ExportMismatchError(
                f"output {name}: onnxruntime shape {tuple(actual.shape)}, "
                f"torch {tuple(expected.shape)} (a shape baked in at export?)"
            )
        diff = (actual - expected).abs()
        abs_diff[name] = diff.max().item() if diff.numel() else 0.0
        rel_diff[name] = (
            (diff / expected.abs().clamp_min(1e-6)).max().item() if diff.numel() else 0.0
        )
        if not torch.allclose(actual, expected, atol=atol, rtol=rtol, equal_nan=True):
            bad.append(name)
    if bad:
        detail = "; ".join(
            f"{n}: max abs diff {abs_diff[n]:.3g}, max rel diff {rel_diff[n]:.3g}" for n in bad
        )
        raise ExportMismatchError(
            f"onnxruntime differs from torch beyond atol={atol}, rtol={rtol}: {detail}"
        )
    return abs_diff, rel_diff


# Export ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _without_kv_cache(model: nn.Module) -> Iterator[None]:
    """Decoders return a KV cache object by default, which is no ONNX output: export without."""
    config = getattr(model, "config", None)
    if not getattr(config, "use_cache", False):
        yield
        return
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = True


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: Any = None,
    *,
    opset: int = 20,
    dynamic: bool = True,
    dtype: str = "fp32",
    decomposition: str = "softplus",
    verify: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    convert_activations: bool = False,
    external_data: bool | None = None,
    functions: bool = False,
) -> ExportReport:
    """Export ``model`` to ONNX at ``path`` with every Serf as standard ops.

    Args:
        example_inputs: a tensor, a tuple (positional) or a dict (keyword) of tensors; inferred
            for timm and transformers models when omitted.
        dynamic: dynamic batch (and sequence length for text inputs).
        dtype: ``"fp32"`` or ``"fp16"`` (Serf itself stays float32 inside the fp16 graph).
        decomposition: ``"softplus"`` (Softplus, Erf, Mul) or ``"exp-log"`` (Exp, Add, Log,
            Erf, Mul: faster on onnxruntime's CPU).
        verify: check with onnxruntime against torch on fresh inputs of another batch size.
        atol, rtol: verification tolerances (default: 1e-4 for fp32, 2e-2 for fp16).
        convert_activations: convert the model's activations to Serf first (a copy); without
            it, a model is exported as it is and the report counts what is left.
        external_data: weights in a side file ``<path>.data``; default: only above 2 GB, the
            protobuf limit.
        functions: emit each Serf as one call of the model-local ONNX function
            ``serfswap.Serf`` (body: the decomposition), for readable graphs and single-node
            pattern matching; onnxruntime inlines it at load.

    Returns:
        An :class:`ExportReport`. Raises :class:`ExportMismatchError` when verification fails;
        nothing is written then.
    """
    from .onnx_ops import DECOMPOSITIONS, check_graph, translation_table

    if decomposition not in DECOMPOSITIONS:
        raise ExportError(f"decomposition={decomposition!r}: use one of {sorted(DECOMPOSITIONS)}")
    if dtype not in DTYPES:
        raise ExportError(f"dtype={dtype!r}: use one of {sorted(DTYPES)}")
    path = Path(path)
    check_output_path(path)
    program = model if isinstance(model, torch.export.ExportedProgram) else None
    if program is not None:  # a torch.export program: its shapes and inputs are its own
        if convert_activations:
            raise ExportError("convert needs a module, not a torch.export program")
        model = program.module()
        if example_inputs is None:
            args, kwargs = program.example_inputs
            example_inputs = {**_as_kwargs(model, args), **kwargs}
        dynamic = False
    elif convert_activations:
        model = convert(model)
    report_of_swap = model.__dict__.get(REPORT_ATTR)
    converted_count = len(report_of_swap.converted) if report_of_swap is not None else 0
    inferred = example_inputs is None
    inputs = example_inputs_for(model) if inferred else _as_kwargs(model, example_inputs)
    if dtype != "fp32":
        model = copy.deepcopy(model).to(DTYPES[dtype])
        inputs = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in inputs.items()}
    seq_names = _sequence_inputs(inputs)
    default_atol, default_rtol = TOLERANCE[dtype]
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol

    # An exported program's module has no train/eval modes: its graph fixed them.
    mode = contextlib.nullcontext() if program is not None else eval_mode(model)
    # keep_custom_op: the tracer sees serfswap::serf, which the translation table maps to the
    # exact pattern; outside it, tracers get Serf's ATen ops (serf.py says why).
    with _without_kv_cache(model), mode, keep_custom_op():
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            onnx_program = torch.onnx.export(
                program if program is not None else model,
                (),
                kwargs=inputs,
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=_dynamic_shapes(inputs, seq_names) if dynamic else None,
                custom_translation_table=translation_table(decomposition),
                verbose=False,
            )
            size = sum(p.numel() * p.element_size() for p in model.parameters())
            onnx_program.model.metadata_props.update(
                {
                    "serfswap.version": __version__,
                    "serfswap.decomposition": decomposition,
                    "serfswap.converted_activations": str(converted_count),
                }
            )
            staged = staging / path.name
            onnx_program.save(
                staged, external_data=size > _TWO_GB if external_data is None else external_data
            )
            import onnx

            if functions:
                _fold_into_functions(staged)
            onnx.checker.check_model(str(staged), full_check=True)
            graph = check_graph(onnx.load(str(staged), load_external_data=False), str(staging))
            if graph.custom_domains:
                raise ExportError(f"the graph uses non-standard domains {graph.custom_domains}")
            if graph.bad_functions:
                raise ExportError(f"functions with a body that is not Serf: {graph.bad_functions}")
            report = ExportReport(
                path=path,
                decomposition=decomposition,
                opset=opset,
                dtype=dtype,
                inputs={k: tuple(v.shape) for k, v in inputs.items()},
                serf_nodes=graph.serf_total,
                leftovers=dict(graph.leftovers),
                converted_activations=converted_count,
                functions=functions and graph.serf_total > 0,
                size_bytes=sum(f.stat().st_size for f in staging.iterdir()),
            )
            if verify:
                grow = {0: 1, 1: 3} if dynamic else {0: 0, 1: 0}
                fresh = _fresh_like(inputs, grow, seq_names)
                report.max_abs_diff, report.max_rel_diff = _compare(
                    model, staged, fresh, atol, rtol, positional=program is not None
                )
                report.verified = True
            for staged_file in staging.iterdir():
                target = path.parent / staged_file.name
                os.replace(staged_file, target)
                if target != path:
                    report.external_data = target
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return report
