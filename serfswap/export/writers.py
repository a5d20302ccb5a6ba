"""The two torch exporters, each writing one shape plan of a :class:`Request` to a staged file
with serfswap's metadata: the dynamo exporter (``torch.export``, Serf through the translation
table) and the TorchScript one (``torch.jit.trace``, Serf traced as the decomposition's ATen
ops); then the dynamic axes named and, when asked, every Serf folded into a function call."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .._version import __version__
from ..names import BATCH, SEQUENCE
from ..ops.serf import aten_for_onnx
from .failures import AttemptFailed, one_line
from .naming import leaves, name_axes
from .request import PROTOBUF_LIMIT, Request, ShapePlan, weight_bytes

if TYPE_CHECKING:
    import onnx


@dataclass
class Written:
    """What :func:`write` learnt: the dynamic axes by input, and torch's notice when the
    exporter it used is deprecated."""

    axes: dict[str, list[str]]
    deprecation: str | None


def write(req: Request, exporter: str, shapes: ShapePlan, staged: Path) -> Written:
    """Export ``req`` with ``shapes`` to ``staged`` with serfswap's metadata, the dynamic axes
    named, no intermediate shape annotations, and (``functions``) every Serf folded into a
    function call."""
    from ..onnx_ops.value_info import strip_value_info_file

    if exporter == "torchscript":
        note = _export_torchscript(req, shapes, staged)
    else:
        note = None
        _export_dynamo(req, shapes, staged)
    axes = name_axes(staged, req.seq_names)
    strip_value_info_file(staged)  # why: serfswap/onnx_ops/value_info.py
    if req.functions:
        _fold_into_functions(staged)
    return Written(axes, note)


_METADATA = "serfswap.version", "serfswap.decomposition", "serfswap.converted_activations"


def _metadata(req: Request) -> dict[str, str]:
    """What every file records of its making, in ``metadata_props``."""
    return dict(zip(_METADATA, (__version__, req.decomposition, str(req.converted_count)),
                    strict=True))  # fmt: skip


def _needs_side_file(req: Request) -> bool:
    """Weights in a side file: as asked, else only above protobuf's 2 GB limit."""
    if req.external_data is None:
        return weight_bytes(req.model) > PROTOBUF_LIMIT
    return req.external_data


def _export_dynamo(req: Request, shapes: ShapePlan, staged: Path) -> None:
    """torch.onnx.export(dynamo=True) of ``req`` to ``staged``, ``serfswap::serf`` written by
    the decomposition's translation (:mod:`serfswap.onnx_ops.translation`).

    The graph is optimised by onnxscript's optimizer (constant folding, dead code), as
    torch.onnx.export does, but without onnxscript's opset-23 fusions, which torch runs after it:
    their RotaryEmbedding nodes fail in onnxruntime 1.32 at any sequence length but the traced
    one ("cos_cache ... expected to have the same shape as input 'x'", a LLaMA), which forced a
    static sequence. Attention at opset 23 is torch's own translation of
    scaled_dot_product_attention and stays; onnxruntime fuses RMS norms itself when it loads a
    file (SimplifiedLayerNormalization)."""
    import onnxscript.optimizer

    from ..onnx_ops.translation import translation_table

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
            optimize=False,
            verbose=False,
        )
        onnxscript.optimizer.optimize_ir(onnx_program.model)
    except Exception as exc:  # the exporter's many kinds: one line of ours
        raise AttemptFailed(f"the exporter: {one_line(exc)}", exc) from None
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
        return tuple(leaves(self.model(**dict(zip(self.names, tensors, strict=True)))))


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


def _export_torchscript(req: Request, shapes: ShapePlan, staged: Path) -> str | None:
    """torch.onnx.export(dynamo=False) of ``req`` to ``staged``, Serf traced as the chosen
    decomposition's ATen ops (:func:`serfswap.ops.serf.aten_for_onnx`); torch's deprecation notice
    of this exporter, if it gives one."""
    import warnings

    import onnx

    names = list(req.inputs)
    dynamic_axes = {}
    for name, t in req.inputs.items():
        axes = {0: BATCH} if t.dim() and name in shapes.batch else {}
        if name in shapes.sequence and t.dim() > 1:
            axes[1] = SEQUENCE
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
            raise AttemptFailed(f"the TorchScript exporter: {one_line(exc)}", exc) from None
    proto = onnx.load(str(staged), load_external_data=False)  # the weights stay in their files
    proto.metadata_props.extend(
        onnx.StringStringEntryProto(key=k, value=v) for k, v in _metadata(req).items()
    )
    _weights_as_ours(proto, staged, side=_needs_side_file(req))
    onnx.save(proto, str(staged))
    notices = (
        str(w.message) for w in caught if issubclass(w.category, DeprecationWarning | FutureWarning)
    )
    return next((n.splitlines()[0] for n in notices if "remov" in n or "deprecat" in n), None)


# Tensors smaller than this stay inside the ONNX file, as the dynamo exporter (onnx_ir) keeps them.
_INLINE_BELOW = 256


def _weights_as_ours(proto: onnx.ModelProto, staged: Path, *, side: bool) -> None:
    """The TorchScript exporter's weights as serfswap writes them: inline, or (``side``) in one
    side file ``<name>.data``. Above 2 GB the exporter writes a file per tensor; they move one
    tensor at a time, so that the whole model is never in memory as one message."""
    from onnx.external_data_helper import (
        ExternalDataInfo,
        load_external_data_for_tensor,
        save_external_data,
        set_external_data,
        uses_external_data,
    )

    folder, location = staged.parent, f"{staged.name}.data"
    read: set[str] = set()
    for tensor in proto.graph.initializer:
        if uses_external_data(tensor):
            where = ExternalDataInfo(tensor).location
            if side and where == location:
                continue  # in the side file already
            read.add(where)
            load_external_data_for_tensor(tensor, str(folder))
        if side and len(tensor.raw_data) >= _INLINE_BELOW:
            set_external_data(tensor, location)
            save_external_data(tensor, str(folder))  # appended to the side file
            tensor.ClearField("raw_data")
    for name in read:  # every tensor they held is inline or in the side file now
        (folder / name).unlink()


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
