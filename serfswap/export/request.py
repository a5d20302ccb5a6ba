"""One export, checked and decided before any file is touched: the options checked, a
``.pt2`` program unwrapped, the model converted (a copy) and cast, the inputs inferred or named,
the tolerances, the shape plans and the exporters to try chosen."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ExportError, InvalidArgumentError
from ..io.paths import check_output_path
from ..names import ATTENTION_MASK
from ..onnx_ops.decompositions import DECOMPOSITIONS
from ..options import EXPORTERS, TEXT_GENERATION_WITH_PAST, TOLERANCE, check_opset
from ..rewrite.convert import REPORT_ATTR, convert
from .decoder import DecoderWithPast, check_task, with_past
from .naming import named_inputs, sequence_inputs
from .seq2seq_parts import Seq2SeqPart

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# Protobuf's limit on one message: an ONNX file with its weights inside cannot pass it.
PROTOBUF_LIMIT = 2 * 1024**3


def weight_bytes(model: nn.Module) -> int:
    """The bytes of ``model``'s parameters: what an ONNX file of it holds as weights."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


@dataclass
class ShapePlan:
    """Which inputs get a dynamic batch (dim 0) and a dynamic sequence (dim 1)."""

    label: str
    batch: set[str]
    sequence: set[str]
    exact: dict[str, Any] | None = None  # a task's own dynamic shapes, other axes than 0 and 1

    def dynamic_shapes(self, inputs: dict[str, torch.Tensor]) -> dict[str, Any] | None:
        """The plan as torch.export's ``dynamic_shapes`` (None: static)."""
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


@dataclass
class Request:
    """One export, checked and ready: what :func:`prepare` makes, with no file touched yet."""

    model: nn.Module
    program: torch.export.ExportedProgram | None
    path: Path
    inputs: dict[str, torch.Tensor]
    seq_names: set[str]
    plans: list[ShapePlan]  # the shape plans to try, in order, with each exporter
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
    # text-generation-with-past (decoder.py), or one file of a seq2seq task (seq2seq.py)
    decoder: DecoderWithPast | Seq2SeqPart | None = None
    quantize: str | None = None  # export_onnx(quantize=): serfswap/export/quantize.py
    optimize: bool = False  # export_onnx(optimize=): serfswap/export/optimize.py


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


def _check_one_file(model: nn.Module, external_data: bool | None) -> None:
    """``external_data=False`` (weights inside the ONNX file) only for weights under 2 GB:
    refused before the export, not after it, in protobuf's words."""
    if external_data is False and weight_bytes(model) > PROTOBUF_LIMIT:
        raise ExportError(
            f"external_data=False, but the weights are {weight_bytes(model) / 1e9:.2f} GB: over "
            "protobuf's 2 GB, one ONNX file cannot hold them; leave external_data at None (a "
            "side file above 2 GB)",
            option="external_data",
        )


def _shape_plans(
    inputs: dict[str, torch.Tensor], seq_names: set[str], dynamic: bool | None
) -> list[ShapePlan]:
    """The shape plans to try: as asked, then (``dynamic=None``) a dynamic batch with a static
    sequence, then static shapes."""
    if dynamic is False:
        return [ShapePlan("static", set(), set())]
    plans = [ShapePlan("dynamic", set(inputs), seq_names)]
    if dynamic is None:
        if seq_names:
            plans.append(ShapePlan("dynamic batch, static sequence", set(inputs), set()))
        plans.append(ShapePlan("static", set(), set()))
    return plans


def prepare(
    model: nn.Module | torch.export.ExportedProgram,
    path: str | os.PathLike[str],
    example_inputs: Any,
    *,
    dynamic: bool | None,
    convert_activations: bool,
    task: str,
    exporter: str,
    **options: Any,
) -> Request:
    """All the checks and all the decisions of an export, and no I/O: a ``.pt2`` program is
    unwrapped, the model converted (a copy) and cast, the inputs inferred or named, the
    tolerances and shape plans chosen. ``options``: the remaining fields of :class:`Request`
    (``atol`` / ``rtol`` may be None: the dtype's default)."""
    _check_options(
        model, options["opset"], options["decomposition"], options["dtype"], dynamic, exporter
    )
    # The ONNX side (onnx, onnxscript: ~2 s) is imported now, before anything is staged: with
    # that import inside the staging, a SIGINT sent as the staging folder appeared was lost and
    # the export ran to its end (exit 0; twice in a row under load, in
    # test_interrupted_export_leaves_nothing). serfswap.onnx_ops itself imports them lazily.
    from ..onnx_ops import graph, translation  # noqa: F401

    path = check_output_path(Path(path))
    check_task(model, task)
    program = model if isinstance(model, torch.export.ExportedProgram) else None
    if program is not None:  # a torch.export program: its shapes and inputs are its own
        if convert_activations:
            raise ExportError("convert needs a module, not a torch.export program")
        model = program.module()
        if example_inputs is None:
            args, kwargs = program.example_inputs
            example_inputs = {**named_inputs(model, args), **kwargs}
        dynamic = False
    elif convert_activations:
        model = convert(model, example_inputs=example_inputs)
    swap = model.__dict__.get(REPORT_ATTR)
    decoder = with_past(model) if task == TEXT_GENERATION_WITH_PAST else None
    if isinstance(model, Seq2SeqPart):  # one file of a seq2seq task (seq2seq.py)
        decoder = model
    if decoder is not None:  # the model with its cache as flat tensors (decoder.py)
        if example_inputs is not None or dynamic is False:
            raise ExportError(f"task {task!r} makes its own inputs, with dynamic shapes")
        if exporter == "torchscript":
            raise ExportError(f"task {task!r} is exported by the dynamo exporter only")
        model, example_inputs = decoder, decoder.example_inputs()
    inputs = named_inputs(model, example_inputs)
    dtype = options["dtype"]
    if dtype != "fp32":
        model = copy.deepcopy(model).to(DTYPES[dtype])
        inputs = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in inputs.items()}
    _check_one_file(model, options["external_data"])
    seq_names = sequence_inputs(inputs) - ({ATTENTION_MASK} if decoder else set())
    plans = (
        [ShapePlan("dynamic", set(inputs), seq_names, decoder.dynamic_shapes())]
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
    return Request(
        model, program, path, inputs, seq_names, plans, exporters, decoder=decoder,
        converted_count=len(swap.converted) if swap is not None else 0,
        left_at_run_time=len(swap.left) if swap is not None else 0, **options,
    )  # fmt: skip
