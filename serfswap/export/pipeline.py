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
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..errors import (
    ExampleInputsError,
    ExportError,
    ExportFailedError,
    ExportMismatchError,
    InvalidArgumentError,
)
from ..inputs import as_kwargs, example_inputs_for
from ..io.paths import check_input_path, check_output_path, staged_output
from ..modes import eval_mode
from ..names import summarise
from ..onnx_ops.decompositions import DECOMPOSITIONS, PATTERNS
from ..onnx_ops.decompositions import DEFAULT as DEFAULT_DECOMPOSITION
from ..ops.serf import aten_for_onnx, keep_custom_op
from ..options import (  # noqa: F401 (re-exported)
    DEFAULT_DTYPE,
    DEFAULT_OPSET,
    EXPORTERS,
    OPSETS,
    TOLERANCE,
    check_opset,
)
from ..rewrite.convert import REPORT_ATTR, convert
from .decoder import WITH_PAST, DecoderWithPast, check_task, with_past
from .seq2seq import SEQ2SEQ_TASKS, Seq2SeqExportReport
from .seq2seq_parts import Seq2SeqPart

_TWO_GB = 2 * 1024**3
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


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

    def __str__(self) -> str:
        lines = [
            f"wrote {self.path} ({self.size_bytes / 1e6:.1f} MB"
            + (f", weights in {self.external_data.name}" if self.external_data else "")
            + f"), opset {self.opset}, {self.dtype}",
            f"  Serf: {self.serf_nodes} as {self.decomposition} "
            f"({' -> '.join(PATTERNS[self.decomposition])})"
            + (" in calls of the local function serfswap.Serf" if self.functions else "")
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

    from ..onnx_ops.functions import fold_into_functions

    model = onnx.load(str(path), load_external_data=False)
    count = fold_into_functions(model, str(path.parent))
    model.metadata_props.add(key="serfswap.functions", value=str(count))
    onnx.save(model, str(path))


# Example inputs --------------------------------------------------------------------------------


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


def _output_names(model: nn.Module, output: Any) -> list[str]:
    """ONNX output names as the model names its outputs: a ModelOutput's fields
    (``last_hidden_state``, ``pooler_output``, ``logits``), ``logits`` for a timm classifier's
    tensor, ``output`` for a plain module's; nested items get ``.index`` suffixes.

    The order is the exporter's: mappings (ModelOutput is one) in key order without None,
    sequences in order. Walked here because transformers 4.x registers ModelOutput with torch's
    pytree without the keys that ``tree_flatten_with_path`` needs."""
    single = "logits" if isinstance(getattr(model, "pretrained_cfg", None), dict) else "output"

    def walk(value: Any, name: str) -> list[str]:
        if isinstance(value, torch.Tensor):
            return [name or single]
        if isinstance(value, Mapping):
            items = [(str(k), v) for k, v in value.items() if v is not None]
        elif isinstance(value, list | tuple):
            items = [(str(i), v) for i, v in enumerate(value)]
        else:
            return []
        return [n for key, v in items for n in walk(v, f"{name}.{key}" if name else key)]

    return walk(output, "")


def _name_axes(path: Path, seq_names: set[str]) -> dict[str, list[str]]:
    """Rename the exporter's symbolic dimensions (``s72``) to ``batch`` and ``sequence`` in the
    file at ``path``, wherever they appear (inputs, outputs, intermediate shapes); returns the
    dynamic axes of each input by name.

    The exporter gives each input's batch a symbol of its own when the graph never equates
    them (BERT's ``input_ids`` and ``attention_mask``); they are one batch to the user, who
    feeds them together, so they get one name. A symbol that is not dim 0 of an input (batch)
    or dim 1 of a text input (sequence) keeps the exporter's name."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    renames: dict[str, str] = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        # a KV cache in Optimum's layout; a seq2seq cross-attention cache's is the encoder's length
        past = value.name.startswith("past_key_values.") and ".encoder." not in value.name
        named = {0: True, 1: value.name in seq_names, 2: past}
        for index, role in ((0, "batch"), (1, "sequence"), (2, "past_sequence")):
            if index < len(dims) and dims[index].dim_param and named[index]:
                prefix = "decoder_" if value.name.startswith("decoder_") and index == 1 else ""
                renames.setdefault(dims[index].dim_param, prefix + role)
    if any(name.startswith("past_sequence") for name in renames.values()):
        mask = next((v for v in model.graph.input if v.name == "attention_mask"), None)
        if mask is not None and mask.type.tensor_type.shape.dim[1].dim_param:
            renames[mask.type.tensor_type.shape.dim[1].dim_param] = "past_sequence + sequence"
    if renames:
        pattern = re.compile(r"\b(" + "|".join(map(re.escape, renames)) + r")\b")
        for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
            for dim in value.type.tensor_type.shape.dim:
                if dim.dim_param:
                    dim.dim_param = pattern.sub(lambda m: renames[m.group(1)], dim.dim_param)
        onnx.save(model, str(path))
    return {
        value.name: [d.dim_param for d in value.type.tensor_type.shape.dim if d.dim_param]
        for value in model.graph.input
        if any(d.dim_param for d in value.type.tensor_type.shape.dim)
    }


# Verification ------------------------------------------------------------------------------------


def _leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _short_ort(exc: BaseException) -> str:
    """onnxruntime's message without its prefix and source paths: the node and the shapes."""
    text = _one_line(exc)
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"(?:void |bool )?onnxruntime::[\w:]+\([^)]*\)\s*", "", text)  # C++ names
    return re.sub(r"/onnxruntime_src/\S+:\d+ ", "", text)


def _feed(names: list[str], inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """onnxruntime's feed: by name when the file's inputs carry the names given (every file
    serfswap writes), else in order (a file exported with other input names)."""
    if all(name in inputs for name in names) and len(names) <= len(inputs):
        return {name: inputs[name].numpy() for name in names}
    if len(names) == len(inputs):
        return {name: t.numpy() for name, t in zip(names, inputs.values(), strict=True)}
    raise ExportError(f"the ONNX file takes inputs {names}; given {list(inputs)}")


class _ShapeMismatchError(ExportMismatchError):
    """An output of another shape than torch's: a shape baked in at export, which static
    shapes (not a tolerance) may get past."""


def _differences(
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
            raise _ShapeMismatchError(
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


def _compare(
    model: nn.Module,
    path: Path,
    inputs: dict[str, torch.Tensor],
    atol: float,
    rtol: float,
    *,
    positional: bool = False,
) -> tuple[dict[str, float], dict[str, float]]:
    from ..onnx_ops import session

    # onnxruntime logs its own failures (a coloured line on stderr) before raising them: the
    # raised error is reported in one line of ours instead; --debug shows onnxruntime's log.
    quiet = not logging.getLogger("serfswap").isEnabledFor(logging.DEBUG)
    sess = session(path, "cpu", log_severity=4 if quiet else None)
    feed = _feed([i.name for i in sess.get_inputs()], inputs)
    try:
        got = sess.run(None, feed)
    except Exception as exc:  # onnxruntime's Fail, InvalidArgument, RuntimeException...
        sizes = ", ".join(f"{k} {'x'.join(map(str, v.shape))}" for k, v in inputs.items())
        raise ExportFailedError(
            f"onnxruntime cannot run the exported graph at {sizes}: {_short_ort(exc)}"
        ) from None
    with torch.no_grad():
        want = _leaves(model(*inputs.values()) if positional else model(**inputs))
    names = [o.name for o in sess.get_outputs()]
    if len(got) != len(want):
        raise ExportMismatchError(f"onnxruntime gave {len(got)} outputs, torch {len(want)}")
    for name, torch_out in zip(names, want, strict=True):
        if not bool(torch.isfinite(torch_out).all()):
            raise ExportError(
                f"torch's output {name} holds NaN or inf on the verification inputs: the model "
                "itself is broken (non-finite weights?); refusing to write it"
            )
    return _differences(names, got, want, atol, rtol)


# Export ------------------------------------------------------------------------------------------


def _run_once(model: nn.Module, inputs: dict[str, torch.Tensor], *, positional: bool) -> Any:
    """One forward in torch first: inputs the model rejects fail here, in one line that names
    them, instead of inside the exporter after pages of its log."""
    described = ", ".join(f"{k} {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}"
                          for k, v in inputs.items())  # fmt: skip
    try:
        with torch.no_grad():
            return model(*inputs.values()) if positional else model(**inputs)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"the model fails on the example inputs ({described}): {reason}"
        ) from None


def _configs(model: nn.Module) -> list[Any]:
    """Every transformers config in the model, once each: submodules may hold their own (T5's
    decoder stack) or share the root's."""
    found = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    return list(found.values())


@contextlib.contextmanager
def _without_kv_cache(model: nn.Module) -> Iterator[None]:
    """Decoders return a KV cache object by default, which is no ONNX output: export without.

    Every config in the model, not only the root's: T5's decoder stack holds a copy of its
    own, and would return an EncoderDecoderCache that no exporter can flatten.
    """
    cached = [c for c in _configs(model) if getattr(c, "use_cache", False) is True]
    for config in cached:
        config.use_cache = False
    try:
        yield
    finally:
        for config in cached:
            config.use_cache = True


@contextlib.contextmanager
def _exportable_experts(model: nn.Module) -> Iterator[bool]:
    """Mixture-of-experts layers of transformers 5 run ``grouped_mm`` by default, a custom op
    (``transformers::grouped_mm_fallback`` on CPU) that neither torch exporter translates;
    ``batched_mm`` computes the same sums with gathers and batched matmuls, which export with
    dynamic shapes (Mixtral, measured). Switched for the export and its verification, then
    back; yields whether anything was switched, for the report."""
    grouped = [c for c in _configs(model)
               if getattr(c, "_experts_implementation", None) == "grouped_mm"]  # fmt: skip
    for config in grouped:
        config._experts_implementation = "batched_mm"
    try:
        yield bool(grouped)
    finally:
        for config in grouped:
            config._experts_implementation = "grouped_mm"


@dataclass
class _Shapes:
    """Which inputs get a dynamic batch (dim 0) and a dynamic sequence (dim 1)."""

    label: str
    batch: set[str]
    sequence: set[str]
    exact: dict[str, Any] | None = None  # a task's own dynamic shapes, other axes than 0 and 1

    def dynamic_shapes(self, inputs: dict[str, torch.Tensor]) -> dict[str, Any] | None:
        if self.exact is not None:
            return self.exact
        if not self.batch and not self.sequence:
            return None
        auto = torch.export.Dim.AUTO
        shapes: dict[str, Any] = {}
        for name, t in inputs.items():
            dims = {0: auto} if t.dim() and name in self.batch else {}
            if name in self.sequence and t.dim() > 1:
                dims[1] = auto
            shapes[name] = dims
        return shapes

    def grow(self) -> dict[int, int]:
        """How much bigger the verification inputs are: another size on every dynamic axis."""
        return {0: 1 if self.batch else 0, 1: 3 if self.sequence else 0}


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _one_line(exc: BaseException) -> str:
    """The first line of an error, without terminal colours and object addresses. torch's
    exporter says only which step failed ("Failed to export the model with torch.export.
    This is step 1/3 ..."); the cause it chains is what the user needs, so it follows."""
    text = _ANSI.sub("", str(exc)).strip()
    text = re.sub(r"<([\w.]+) object at 0x[0-9a-f]+>", r"\1", text)
    line = text.splitlines()[0] if text else type(exc).__name__
    cause = exc.__cause__
    if cause is not None and " This is step " in line:
        line = line.split(" This is step ")[0].rstrip(".") + ": " + _one_line(cause)
    return line


class _AttemptFailed(Exception):
    """One shape plan failed in a way another plan may not: the exporter, onnx.checker,
    onnxruntime or verification."""

    def __init__(self, reason: str, error: BaseException) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error

    def error_with(self, before: list[str], *, dynamic: bool) -> Exception:
        """The error to raise when no plan is left: serfswap's own kind where it was one.
        ``dynamic``: every plan tried had dynamic axes, so static shapes are worth a try."""
        message = self.reason + (f" (before: {'; '.join(before)})" if before else "")
        if isinstance(self.error, ExportMismatchError) and not isinstance(
            self.error, _ShapeMismatchError
        ):  # numbers that differ are no matter of shapes: static shapes compute the same
            return ExportMismatchError(
                message + "; if the difference is acceptable for your use, set --atol/--rtol"
            )
        if dynamic:
            message += "; try --static"
        return ExportFailedError(message)


@dataclass
class _Request:
    """One export, checked and ready: what :func:`_prepare` makes, with no file touched yet."""

    model: nn.Module
    program: torch.export.ExportedProgram | None
    path: Path
    inputs: dict[str, torch.Tensor]
    seq_names: set[str]
    plans: list[_Shapes]  # the shape plans to try, in order, with each exporter
    exporters: list[str]  # the exporters to try, in order
    opset: int
    decomposition: str
    dtype: str
    converted_count: int
    external_data: bool | None
    functions: bool
    verify: bool
    atol: float
    rtol: float
    output_names: list[str] = field(default_factory=list)
    left_at_run_time: int = 0  # activations the model's conversion left running (its report)
    # text-generation-with-past (export/decoder.py), or one file of a seq2seq task (seq2seq.py)
    decoder: DecoderWithPast | Seq2SeqPart | None = None


def _named(model: nn.Module, example_inputs: Any) -> dict[str, torch.Tensor]:
    """The example inputs as keywords, inferred when None; an export's error when they cannot
    be (the message says to pass example_inputs)."""
    try:
        if example_inputs is None:
            return example_inputs_for(model)
        return as_kwargs(model, example_inputs)
    except ExampleInputsError as error:
        raise ExportError(str(error)) from None


def _check_options(
    model: Any, opset: int, decomposition: str, dtype: str, dynamic: Any, exporter: str
) -> None:
    """Every option's type and value, before anything runs."""
    if not isinstance(model, nn.Module | torch.export.ExportedProgram):
        raise InvalidArgumentError(
            f"export_onnx() takes an nn.Module or a torch.export program, got {model!r:.80}"
        )
    check_opset(opset)
    if decomposition not in DECOMPOSITIONS:
        raise ExportError(f"decomposition={decomposition!r}: use one of {sorted(DECOMPOSITIONS)}")
    if dtype not in DTYPES:
        raise ExportError(f"dtype={dtype!r}: use one of {sorted(DTYPES)}")
    if exporter not in EXPORTERS:
        raise ExportError(f"exporter={exporter!r}: use one of {list(EXPORTERS)}")
    program = isinstance(model, torch.export.ExportedProgram)  # its shapes are its own
    if program and exporter == "torchscript":
        raise ExportError("a torch.export program is exported by the dynamo exporter only")
    if dynamic is not None and not isinstance(dynamic, bool) and not program:
        raise InvalidArgumentError(f"dynamic= takes True, False or None, got {dynamic!r}")


def _shape_plans(
    inputs: dict[str, torch.Tensor], seq_names: set[str], dynamic: bool | None
) -> list[_Shapes]:
    """The shape plans to try: as asked, then (``dynamic=None``) a dynamic batch with a static
    sequence, then static shapes."""
    if dynamic is False:
        return [_Shapes("static", set(), set())]
    plans = [_Shapes("dynamic", set(inputs), seq_names)]
    if dynamic is None:
        if seq_names:
            plans.append(_Shapes("dynamic batch, static sequence", set(inputs), set()))
        plans.append(_Shapes("static", set(), set()))
    return plans


def _prepare(
    model: nn.Module | torch.export.ExportedProgram,
    path: str | os.PathLike[str],
    example_inputs: Any,
    *,
    dynamic: bool | None,
    convert_activations: bool,
    task: str,
    exporter: str,
    **options: Any,
) -> _Request:
    """All the checks and all the decisions of an export, and no I/O: a ``.pt2`` program is
    unwrapped, the model converted (a copy) and cast, the inputs inferred or named, the
    tolerances and shape plans chosen. ``options``: the remaining fields of :class:`_Request`
    (``atol`` / ``rtol`` may be None: the dtype's default)."""
    _check_options(
        model, options["opset"], options["decomposition"], options["dtype"], dynamic, exporter
    )
    # The ONNX side (onnx, onnxscript, onnxruntime: ~2 s) is imported now, before anything is
    # staged: with that import inside the staging, a SIGINT sent as the staging folder appeared
    # was lost and the export ran to its end (exit 0; twice in a row under load, in
    # test_interrupted_export_leaves_nothing).
    import serfswap.onnx_ops  # noqa: F401

    path = check_output_path(Path(path))
    check_task(model, task)
    program = model if isinstance(model, torch.export.ExportedProgram) else None
    if program is not None:  # a torch.export program: its shapes and inputs are its own
        if convert_activations:
            raise ExportError("convert needs a module, not a torch.export program")
        model = program.module()
        if example_inputs is None:
            args, kwargs = program.example_inputs
            example_inputs = {**_named(model, args), **kwargs}
        dynamic = False
    elif convert_activations:
        model = convert(model, example_inputs=example_inputs)
    swap = model.__dict__.get(REPORT_ATTR)
    decoder = with_past(model) if task == WITH_PAST else None
    if isinstance(model, Seq2SeqPart):  # one file of a seq2seq task (export/seq2seq.py)
        decoder = model
    if decoder is not None:  # the model with its cache as flat tensors (export/decoder.py)
        if example_inputs is not None or dynamic is False:
            raise ExportError(f"task {task!r} makes its own inputs, with dynamic shapes")
        if exporter == "torchscript":
            raise ExportError(f"task {task!r} is exported by the dynamo exporter only")
        model, example_inputs = decoder, decoder.example_inputs()
    inputs = _named(model, example_inputs)
    dtype = options["dtype"]
    if dtype != "fp32":
        model = copy.deepcopy(model).to(DTYPES[dtype])
        inputs = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in inputs.items()}
    seq_names = _sequence_inputs(inputs) - ({"attention_mask"} if decoder else set())
    plans = (
        [_Shapes("dynamic", set(inputs), seq_names, decoder.dynamic_shapes())]
        if decoder is not None
        else _shape_plans(inputs, seq_names, dynamic)
    )
    default_atol, default_rtol = TOLERANCE[dtype]
    options["atol"] = default_atol if options["atol"] is None else options["atol"]
    options["rtol"] = default_rtol if options["rtol"] is None else options["rtol"]
    if exporter != "auto":
        exporters = [exporter]
    else:  # a program and a decoder's cache layout are torch.export's own
        exporters = (
            ["dynamo"] if program is not None or decoder is not None else list(EXPORTERS[1:])
        )
    return _Request(
        model, program, path, inputs, seq_names, plans, exporters, decoder=decoder,
        converted_count=len(swap.converted) if swap is not None else 0,
        left_at_run_time=len(swap.left) if swap is not None else 0, **options,
    )  # fmt: skip


def _write(req: _Request, exporter: str, shapes: _Shapes, staged: Path) -> _Written:
    """Export ``req`` with ``shapes`` to ``staged`` with serfswap's metadata, the dynamic axes
    named and (``functions``) every Serf folded into a function call."""
    if exporter == "torchscript":
        note = _export_torchscript(req, shapes, staged)
    else:
        note = None
        _export_dynamo(req, shapes, staged)
    axes = _name_axes(staged, req.seq_names)
    if req.functions:
        _fold_into_functions(staged)
    return _Written(axes, note)


@dataclass
class _Written:
    """What :func:`_write` learnt: the dynamic axes by input, and torch's notice when the
    exporter it used is deprecated."""

    axes: dict[str, list[str]]
    deprecation: str | None


_METADATA = "serfswap.version", "serfswap.decomposition", "serfswap.converted_activations"


def _metadata(req: _Request) -> dict[str, str]:
    return dict(zip(_METADATA, (__version__, req.decomposition, str(req.converted_count)),
                    strict=True))  # fmt: skip


def _needs_side_file(req: _Request) -> bool:
    size = sum(p.numel() * p.element_size() for p in req.model.parameters())
    return size > _TWO_GB if req.external_data is None else req.external_data


def _export_dynamo(req: _Request, shapes: _Shapes, staged: Path) -> None:
    from ..onnx_ops import translation_table

    try:
        onnx_program = torch.onnx.export(
            req.program if req.program is not None else req.model,
            (),
            kwargs=req.inputs,
            dynamo=True,
            opset_version=req.opset,
            dynamic_shapes=shapes.dynamic_shapes(req.inputs),
            custom_translation_table=translation_table(req.decomposition),
            output_names=req.output_names,
            input_names=req.decoder.onnx_input_names if req.decoder else None,
            verbose=False,
        )
    except Exception as exc:  # the exporter's many kinds: one line of ours
        raise _AttemptFailed(f"the exporter: {_one_line(exc)}", exc) from None
    onnx_program.model.metadata_props.update(_metadata(req))
    onnx_program.save(staged, external_data=_needs_side_file(req))


class _Positional(nn.Module):
    """The model called with keywords from positional tensors, its outputs flattened: what
    torch.jit.trace can trace. transformers 5 models fail when the TorchScript exporter passes
    their inputs itself (``forward() got multiple values for argument 'use_cache'``)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = names
        # The exporter puts the module it is given in eval mode and back into the mode it found
        # it in, recursively: a wrapper left in train mode would leave the model in train mode
        # (BatchNorm on batch statistics) for the verification that follows.
        self.training = model.training

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(_leaves(self.model(**dict(zip(self.names, tensors, strict=True)))))


@contextlib.contextmanager
def _native_output_dropped() -> Iterator[None]:
    """Drop what native code writes to stdout and stderr meanwhile: the TorchScript exporter
    prints the whole traced graph (thousands of lines) from C++ when an op has no ONNX form,
    where the error we raise says it in one line. ``--debug`` (the serfswap logger at DEBUG)
    keeps it."""
    import sys
    import tempfile

    if logging.getLogger("serfswap").isEnabledFor(logging.DEBUG):
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


def _export_torchscript(req: _Request, shapes: _Shapes, staged: Path) -> str | None:
    """torch.onnx.export(dynamo=False) of ``req`` to ``staged``, Serf traced as the chosen
    decomposition's ATen ops (:func:`serfswap.serf.aten_for_onnx`); torch's deprecation notice
    of this exporter, if it gives one."""
    import warnings

    import onnx

    names = list(req.inputs)
    dynamic_axes = {}
    for name, t in req.inputs.items():
        axes = {0: "batch"} if t.dim() and name in shapes.batch else {}
        if name in shapes.sequence and t.dim() > 1:
            axes[1] = "sequence"
        if axes:
            dynamic_axes[name] = axes
    with (
        warnings.catch_warnings(record=True) as caught,
        aten_for_onnx(req.decomposition),
        _native_output_dropped(),
    ):
        warnings.simplefilter("always")
        try:
            torch.onnx.export(
                _Positional(req.model, names), tuple(req.inputs.values()), str(staged),
                dynamo=False, opset_version=req.opset, input_names=names,
                output_names=req.output_names, dynamic_axes=dynamic_axes or None,
            )  # fmt: skip
        except Exception as exc:  # the exporter's many kinds: one line of ours
            raise _AttemptFailed(f"the TorchScript exporter: {_one_line(exc)}", exc) from None
    proto = onnx.load(str(staged))  # with any side files it wrote, rewritten as ours
    proto.metadata_props.extend(
        onnx.StringStringEntryProto(key=k, value=v) for k, v in _metadata(req).items()
    )
    for other in staged.parent.iterdir():
        if other != staged:
            other.unlink()
    side = _needs_side_file(req)
    onnx.save(proto, str(staged), save_as_external_data=side, all_tensors_to_one_file=True,
              location=f"{staged.name}.data")  # fmt: skip
    notices = (
        str(w.message) for w in caught if issubclass(w.category, DeprecationWarning | FutureWarning)
    )
    return next((n.splitlines()[0] for n in notices if "remov" in n or "deprecat" in n), None)


def _inspect(req: _Request, staged: Path, wrote: _Written) -> ExportReport:
    """onnx.checker (full), the opset written, the graph's domains, functions and Serf count:
    the report of the staged file, with the paths it will have once in place."""
    import onnx

    from ..onnx_ops import check_graph

    try:
        onnx.checker.check_model(str(staged), full_check=True)
    except Exception as exc:  # ValidationError, InferenceError
        raise _AttemptFailed(f"onnx.checker: {_one_line(exc)}", exc) from None
    written = onnx.load(str(staged), load_external_data=False)
    opset = next(o.version for o in written.opset_import if o.domain in ("", "ai.onnx"))
    if opset != req.opset:
        raise ExportError(f"asked for opset {req.opset}, the exporter wrote {opset}")
    graph = check_graph(written, str(staged.parent))
    if graph.custom_domains:
        raise ExportError(f"the graph uses non-standard domains {graph.custom_domains}")
    if graph.bad_functions:
        raise ExportError(f"functions with a body that is not Serf: {graph.bad_functions}")
    side_files = [f for f in staged.parent.iterdir() if f != staged]
    names = req.decoder.onnx_input_names if req.decoder else list(req.inputs)
    return ExportReport(
        path=req.path,
        decomposition=req.decomposition,
        opset=opset,
        dtype=req.dtype,
        inputs=dict(zip(names, (tuple(v.shape) for v in req.inputs.values()), strict=True)),
        serf_nodes=graph.serf_total,
        leftovers=dict(graph.leftovers),
        converted_activations=req.converted_count,
        left_at_run_time=req.left_at_run_time,
        functions=req.functions and graph.serf_total > 0,
        outputs=[o.name for o in written.graph.output],
        dynamic_axes=wrote.axes,
        size_bytes=sum(f.stat().st_size for f in staged.parent.iterdir()),
        external_data=req.path.parent / side_files[-1].name if side_files else None,
    )


def _attempt(req: _Request, exporter: str, shapes: _Shapes) -> ExportReport:
    """Write, inspect and verify one exporter's shape plan in a staging folder; in place on
    success."""
    with staged_output(req.path) as staged:
        written = _write(req, exporter, shapes, staged)
        report = _inspect(req, staged, written)
        report.exporter = exporter
        if written.deprecation:
            report.exporter_note = f"torch deprecates it: {written.deprecation}"
        if req.verify:
            fresh_sets = (
                [_fresh_like(req.inputs, shapes.grow(), req.seq_names)]
                if req.decoder is None
                else req.decoder.verification_inputs()  # e.g. past lengths 0 and 7
            )
            for fresh in fresh_sets:  # the worst difference of each output over the sets
                try:
                    abs_diff, rel_diff = _compare(
                        req.model, staged, fresh, req.atol, req.rtol,
                        positional=req.program is not None,
                    )  # fmt: skip
                except (ExportMismatchError, ExportFailedError) as exc:
                    raise _AttemptFailed(str(exc), exc) from None
                for mine, new in ((report.max_abs_diff, abs_diff), (report.max_rel_diff, rel_diff)):
                    mine.update({k: max(v, mine.get(k, 0.0)) for k, v in new.items()})
            report.verified = True
    return report


def _export(req: _Request) -> ExportReport:
    """Try each exporter's shape plans in turn; the first that exports and verifies is
    written, and the report says why the ones before failed."""
    failures: list[tuple[str, str, str]] = []  # exporter, shape plan, why it failed
    tries = [(exporter, shapes) for exporter in req.exporters for shapes in req.plans]
    for number, (exporter, shapes) in enumerate(tries):
        try:
            report = _attempt(req, exporter, shapes)
        except _AttemptFailed as failed:
            failures.append((exporter, shapes.label, failed.reason))
            if number == len(tries) - 1:
                named = len(req.exporters) > 1  # say which exporter each failure was
                before = [f"{e + ' ' if named else ''}{label} failed: {why}"
                          for e, label, why in failures[:-1]]  # fmt: skip
                # static shapes are worth a try when none was tried (and may be asked for)
                only_dynamic = req.decoder is None and all(p.batch or p.sequence for p in req.plans)
                raise failed.error_with(before, dynamic=only_dynamic) from None
            continue
        mine = [f"{label} failed: {why}" for e, label, why in failures if e == exporter]
        if mine:
            report.fallback = "; ".join(mine) + f"; exported with {shapes.label} shapes"
        others = [why for e, _, why in failures if e != exporter]
        if others:  # every plan of the dynamo exporter failed: the first says why
            why = f"the dynamo exporter failed: {others[0].removeprefix('the exporter: ')}"
            report.exporter_note = "; ".join(filter(None, [why, report.exporter_note]))
        return report
    raise AssertionError("no shape plan")  # unreachable: there is always one plan


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
    named = _named(module, inputs)
    with _without_kv_cache(module), mode:
        abs_diff, rel_diff = _compare(module, path, named, atol, rtol, positional=positional)
    return Verification(abs_diff, rel_diff)


def export_onnx(
    model: nn.Module | torch.export.ExportedProgram,
    path: str | os.PathLike[str],
    example_inputs: Any = None,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic: bool | None = None,
    dtype: str = DEFAULT_DTYPE,
    decomposition: str = DEFAULT_DECOMPOSITION,
    verify: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    convert_activations: bool = False,
    external_data: bool | None = None,
    functions: bool = False,
    task: str = "default",
    exporter: str = "auto",
) -> ExportReport | Seq2SeqExportReport:
    """Export ``model`` to ONNX at ``path`` with every Serf as standard ops.

    Args:
        example_inputs: a tensor, a tuple (positional) or a dict (keyword) of tensors; inferred
            for timm and transformers models when omitted.
        dynamic: ``None`` (default): dynamic batch and sequence length (text inputs); where
            that export fails or does not verify at other sizes, a dynamic batch with a static
            sequence, then static shapes, and the report's ``fallback`` says why. ``True``:
            dynamic or an error. ``False``: static shapes.
        dtype: ``"fp32"`` or ``"fp16"`` (Serf itself stays float32 inside the fp16 graph).
        decomposition: ``"softplus"`` (Softplus, Erf, Mul) or ``"exp-log"`` (Exp, Add, Log,
            Erf, Mul: faster on onnxruntime's CPU).
        verify: check with onnxruntime against torch on fresh inputs of another batch size
            (:func:`verify_onnx`).
        atol, rtol: verification tolerances (default: 1e-4 for fp32, 2e-2 for fp16).
        convert_activations: convert the model's activations to Serf first (a copy); without
            it, a model is exported as it is and the report counts what is left.
        external_data: weights in a side file ``<path>.data``; default: only above 2 GB, the
            protobuf limit.
        functions: emit each Serf as one call of the model-local ONNX function
            ``serfswap.Serf`` (body: the decomposition), for readable graphs and single-node
            pattern matching; onnxruntime inlines it at load.
        task: ``"default"``: the model's forward without its KV cache.
            ``"text-generation-with-past"``: a transformers causal LM with its KV cache in
            Optimum's layout (inputs ``past_key_values.{i}.key`` ..., outputs ``present.{i}.key``
            ...), verified at past lengths 0 and 7; see :mod:`serfswap.export.decoder`.
            ``"text2text-generation-with-past"`` (T5, BART, Marian...) and
            ``"automatic-speech-recognition-with-past"`` (Whisper): an encoder-decoder as
            Optimum's three files in the folder ``path`` (encoder, decoder, decoder with past;
            config.json, generation_config.json), each verified; returns a
            :class:`~serfswap.export.seq2seq.Seq2SeqExportReport`. See
            :mod:`serfswap.export.seq2seq`.
        exporter: ``"auto"`` (default): torch's dynamo exporter, and where each of its shape
            plans fails, the TorchScript exporter with the same plans, checks and
            verification (the report's ``exporter`` and ``exporter_note`` say which wrote the
            file and why). ``"dynamo"`` or ``"torchscript"``: that one only. A task's KV-cache
            layout and a torch.export program are the dynamo exporter's.

    Returns:
        An :class:`ExportReport`. Raises :class:`ExportMismatchError` when verification fails;
        nothing is written then.
    """
    if task in SEQ2SEQ_TASKS:  # three files in a folder (export/seq2seq.py)
        from .seq2seq import export_seq2seq

        return export_seq2seq(
            model, path, example_inputs, task=task, convert_activations=convert_activations,
            dynamic=dynamic, exporter=exporter, opset=opset, decomposition=decomposition,
            dtype=dtype, verify=verify, atol=atol, rtol=rtol, external_data=external_data,
            functions=functions,
        )  # fmt: skip
    req = _prepare(
        model, path, example_inputs, dynamic=dynamic, convert_activations=convert_activations,
        opset=opset, decomposition=decomposition, dtype=dtype, external_data=external_data,
        functions=functions, verify=verify, atol=atol, rtol=rtol, task=task, exporter=exporter,
    )  # fmt: skip
    # An exported program's module has no train/eval modes: its graph fixed them.
    mode = contextlib.nullcontext() if req.program is not None else eval_mode(req.model)
    # keep_custom_op: the tracer sees serfswap::serf, which the translation table maps to the
    # exact pattern; outside it, tracers get Serf's ATen ops (serf.py says why).
    with (
        _without_kv_cache(req.model),
        _exportable_experts(req.model) as experts,
        mode,
        keep_custom_op(),
    ):
        output = _run_once(req.model, req.inputs, positional=req.program is not None)
        req.output_names = _output_names(req.model, output)
        report = _export(req)
    if experts:
        note = "mixture-of-experts computed as batched_mm: grouped_mm has no ONNX form"
        report.exporter_note = "; ".join(filter(None, [report.exporter_note, note]))
    return report
