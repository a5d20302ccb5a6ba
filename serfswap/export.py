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
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._version import __version__
from .convert import REPORT_ATTR, convert
from .errors import InvalidArgumentError, SerfswapError
from .export_decoder import WITH_PAST, DecoderWithPast, check_task, verification_inputs, with_past
from .export_decoder import dynamic_shapes as decoder_shapes
from .export_decoder import example_inputs as decoder_example_inputs
from .modes import eval_mode
from .paths import check_output_path
from .serf import keep_custom_op

_TWO_GB = 2 * 1024**3
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# Default tolerances of the verification, per export dtype: measured on the zoo, with margin.
TOLERANCE = {"fp32": (1e-4, 1e-4), "fp16": (2e-2, 2e-2)}  # (atol, rtol)
# The opsets the exporter writes as asked, measured on torch 2.14 + onnxruntime 1.32: 18 is the
# lowest it implements; below, it converts down after export and quietly keeps 18 where that
# fails (17 failed on timm's test_resnet, 16 and lower on a Linear+GELU), and 26 fails to
# convert. The opset actually written is read back from the file, so drift is caught too.
OPSETS = range(18, 26)


def check_opset(opset: object) -> int:
    """``opset`` when the exporter can write it, else ExportError (a usage error)."""
    if type(opset) is not int or opset not in OPSETS:
        raise ExportError(
            f"opset {opset!r} is not supported: use {OPSETS.start} to {OPSETS.stop - 1} "
            "(lower opsets cannot express what the exporter writes)"
        )
    return opset


class ExportError(SerfswapError, ValueError):
    """The export cannot be made as asked: bad option, missing inputs, unwritable target."""

    exit_code = 2


class ExportFailedError(ExportError):
    """No shape plan could be exported and verified: the exporter, onnx.checker or onnxruntime
    failed on the model (a valid request that failed, hence status 1)."""

    exit_code = 1


class _RuntimeFailure(Exception):
    """onnxruntime could not run the exported graph at the verification sizes."""


class ExportMismatchError(ExportError, AssertionError):
    """onnxruntime and torch disagree beyond the tolerance; nothing was written. An ExportError
    (every failure of an export is one) and an AssertionError, as before; status 1."""

    exit_code = 1


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
            "  outputs: " + ", ".join(self.outputs),
            "  dynamic axes: "
            + (
                ", ".join(f"{k}[{', '.join(v)}]" for k, v in self.dynamic_axes.items())
                or "none (static shapes)"
            ),
        ]
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
        channels, *size = cfg["input_size"]
        first = cfg.get("first_conv")  # in_chans=1 models: the weights know, the cfg does not
        first = first[0] if isinstance(first, list | tuple) and first else first
        with contextlib.suppress(AttributeError, TypeError):
            weight = model.get_parameter(f"{first}.weight")
            channels = weight.shape[1] if weight.dim() == 4 else channels
        return {"x": torch.randn(batch, channels, *size)}
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
        if _accepts(model, "token_type_ids") and getattr(config, "type_vocab_size", 0):
            # what a tokenizer gives BERT-style models: the file takes the tokenizer's dict
            inputs["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
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
        past = value.name.startswith("past_key_values.")  # a KV cache in Optimum's layout
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

    # onnxruntime logs its own failures (a coloured line on stderr) before raising them: the
    # raised error is reported in one line of ours instead; --debug shows onnxruntime's log.
    quiet = not logging.getLogger("serfswap").isEnabledFor(logging.DEBUG)
    sess = session(path, "cpu", log_severity=4 if quiet else None)
    feed_names = [i.name for i in sess.get_inputs()]
    named = all(name in inputs for name in feed_names)  # else in order: a task's renamed inputs
    feed = {name: (inputs[name] if named else t).numpy()
            for name, t in zip(feed_names, inputs.values(), strict=False)}  # fmt: skip
    try:
        got = sess.run(None, feed)
    except Exception as exc:  # onnxruntime's Fail, InvalidArgument, RuntimeException...
        sizes = ", ".join(f"{k} {'x'.join(map(str, v.shape))}" for k, v in inputs.items())
        raise _RuntimeFailure(
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
    abs_diff, rel_diff, bad = {}, {}, []
    for name, ort_out, torch_out in zip(names, got, want, strict=True):
        expected = torch_out.float()
        actual = torch.from_numpy(ort_out).float()
        if actual.shape != expected.shape:
            raise ExportMismatchError(
                f"output {name}: onnxruntime shape {tuple(actual.shape)}, "
                f"torch {tuple(expected.shape)} (a shape baked in at export?)"
            )
        if not bool(torch.isfinite(actual).all()):
            raise ExportMismatchError(
                f"onnxruntime's output {name} holds NaN or inf where torch's is finite"
            )
        diff = (actual - expected).abs()
        abs_diff[name] = diff.max().item() if diff.numel() else 0.0
        rel_diff[name] = (
            (diff / expected.abs().clamp_min(1e-6)).max().item() if diff.numel() else 0.0
        )
        if not torch.allclose(actual, expected, atol=atol, rtol=rtol):
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


@contextlib.contextmanager
def _without_kv_cache(model: nn.Module) -> Iterator[None]:
    """Decoders return a KV cache object by default, which is no ONNX output: export without.

    Every config in the model, not only the root's: T5's decoder stack holds a copy of its
    own, and would return an EncoderDecoderCache that no exporter can flatten.
    """
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    cached = [c for c in configs.values() if getattr(c, "use_cache", False) is True]
    for config in cached:
        config.use_cache = False
    try:
        yield
    finally:
        for config in cached:
            config.use_cache = True


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
        ``dynamic``: the plan that failed had dynamic axes, so static shapes are worth a try."""
        message = self.reason + (f" (before: {'; '.join(before)})" if before else "")
        if dynamic and not before:
            message += "; try --static"
        if isinstance(self.error, ExportMismatchError):
            return ExportMismatchError(message)
        return ExportFailedError(message)


@dataclass
class _Job:
    """What one export writes and checks; :meth:`attempt` runs it for one shape plan."""

    model: nn.Module
    program: torch.export.ExportedProgram | None
    path: Path
    inputs: dict[str, torch.Tensor]
    seq_names: set[str]
    opset: int
    decomposition: str
    converted_count: int
    external_data: bool | None
    functions: bool
    verify: bool
    atol: float
    rtol: float
    dtype: str
    output_names: list[str] = field(default_factory=list)
    decoder: DecoderWithPast | None = None  # text-generation-with-past: export_decoder.py

    def attempt(self, shapes: _Shapes) -> ExportReport:
        """Export, check and verify in a staging folder; move the file into place on success."""
        # A short name of its own: any legal name of the target stays legal inside it.
        staging = Path(tempfile.mkdtemp(prefix=".serfswap-", dir=self.path.parent))
        try:
            staged = staging / self.path.name
            self._export(shapes, staged)
            report = self._inspect(staged, staging)
            if self.verify:
                fresh_sets = (
                    [_fresh_like(self.inputs, shapes.grow(), self.seq_names)]
                    if self.decoder is None
                    else verification_inputs(self.decoder)
                )
                for fresh in fresh_sets:  # the worst difference of each output over the sets
                    try:
                        abs_diff, rel_diff = _compare(
                            self.model, staged, fresh, self.atol, self.rtol,
                            positional=self.program is not None,
                        )  # fmt: skip
                    except (ExportMismatchError, _RuntimeFailure) as exc:
                        raise _AttemptFailed(str(exc), exc) from None
                    pairs = ((report.max_abs_diff, abs_diff), (report.max_rel_diff, rel_diff))
                    for mine, new in pairs:
                        mine.update({k: max(v, mine.get(k, 0.0)) for k, v in new.items()})
                report.verified = True
            for staged_file in staging.iterdir():
                target = self.path.parent / staged_file.name
                os.replace(staged_file, target)
                if target != self.path:
                    report.external_data = target
            return report
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _export(self, shapes: _Shapes, staged: Path) -> None:
        from .onnx_ops import translation_table

        try:
            onnx_program = torch.onnx.export(
                self.program if self.program is not None else self.model,
                (),
                kwargs=self.inputs,
                dynamo=True,
                opset_version=self.opset,
                dynamic_shapes=shapes.dynamic_shapes(self.inputs),
                custom_translation_table=translation_table(self.decomposition),
                output_names=self.output_names,
                input_names=self.decoder.onnx_input_names if self.decoder else None,
                verbose=False,
            )
        except Exception as exc:  # the exporter's many kinds: one line of ours
            raise _AttemptFailed(f"the exporter: {_one_line(exc)}", exc) from None
        size = sum(p.numel() * p.element_size() for p in self.model.parameters())
        onnx_program.model.metadata_props.update(
            {
                "serfswap.version": __version__,
                "serfswap.decomposition": self.decomposition,
                "serfswap.converted_activations": str(self.converted_count),
            }
        )
        side = size > _TWO_GB if self.external_data is None else self.external_data
        onnx_program.save(staged, external_data=side)

    def _inspect(self, staged: Path, staging: Path) -> ExportReport:
        import onnx

        from .onnx_ops import check_graph

        axes = _name_axes(staged, self.seq_names)
        if self.functions:
            _fold_into_functions(staged)
        try:
            onnx.checker.check_model(str(staged), full_check=True)
        except Exception as exc:  # ValidationError, InferenceError
            raise _AttemptFailed(f"onnx.checker: {_one_line(exc)}", exc) from None
        written = onnx.load(str(staged), load_external_data=False)
        opset = next(o.version for o in written.opset_import if o.domain in ("", "ai.onnx"))
        if opset != self.opset:
            raise ExportError(f"asked for opset {self.opset}, the exporter wrote {opset}")
        graph = check_graph(written, str(staging))
        if graph.custom_domains:
            raise ExportError(f"the graph uses non-standard domains {graph.custom_domains}")
        if graph.bad_functions:
            raise ExportError(f"functions with a body that is not Serf: {graph.bad_functions}")
        names = self.decoder.onnx_input_names if self.decoder else list(self.inputs)
        return ExportReport(
            path=self.path,
            decomposition=self.decomposition,
            opset=opset,
            dtype=self.dtype,
            inputs=dict(zip(names, (tuple(v.shape) for v in self.inputs.values()), strict=True)),
            serf_nodes=graph.serf_total,
            leftovers=dict(graph.leftovers),
            converted_activations=self.converted_count,
            functions=self.functions and graph.serf_total > 0,
            outputs=[o.name for o in written.graph.output],
            dynamic_axes=axes,
            size_bytes=sum(f.stat().st_size for f in staging.iterdir()),
        )


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: Any = None,
    *,
    opset: int = 20,
    dynamic: bool | None = None,
    dtype: str = "fp32",
    decomposition: str = "softplus",
    verify: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    convert_activations: bool = False,
    external_data: bool | None = None,
    functions: bool = False,
    task: str = "default",
) -> ExportReport:
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
        verify: check with onnxruntime against torch on fresh inputs of another batch size.
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
            ...), verified at past lengths 0 and 7; see :mod:`serfswap.export_decoder`.

    Returns:
        An :class:`ExportReport`. Raises :class:`ExportMismatchError` when verification fails;
        nothing is written then.
    """
    from .onnx_ops import DECOMPOSITIONS

    if not isinstance(model, nn.Module | torch.export.ExportedProgram):
        raise InvalidArgumentError(
            f"export_onnx() takes an nn.Module or a torch.export program, got {model!r:.80}"
        )
    check_opset(opset)
    if decomposition not in DECOMPOSITIONS:
        raise ExportError(f"decomposition={decomposition!r}: use one of {sorted(DECOMPOSITIONS)}")
    if dtype not in DTYPES:
        raise ExportError(f"dtype={dtype!r}: use one of {sorted(DTYPES)}")
    path = Path(path)
    check_output_path(path)
    check_task(model, task)
    program = model if isinstance(model, torch.export.ExportedProgram) else None
    if program is not None:  # a torch.export program: its shapes and inputs are its own
        if convert_activations:
            raise ExportError("convert needs a module, not a torch.export program")
        model = program.module()
        if example_inputs is None:
            args, kwargs = program.example_inputs
            example_inputs = {**_as_kwargs(model, args), **kwargs}
        dynamic = False
    elif dynamic is not None and not isinstance(dynamic, bool):
        raise InvalidArgumentError(f"dynamic= takes True, False or None, got {dynamic!r}")
    elif convert_activations:
        model = convert(model)
    report_of_swap = model.__dict__.get(REPORT_ATTR)
    converted_count = len(report_of_swap.converted) if report_of_swap is not None else 0
    decoder = with_past(model) if task == WITH_PAST else None
    if decoder is not None:  # the model with its cache as flat tensors (export_decoder.py)
        if example_inputs is not None or dynamic is False:
            raise ExportError(f"task {task!r} makes its own inputs, with dynamic shapes")
        model, example_inputs = decoder, decoder_example_inputs(decoder)
    inferred = example_inputs is None
    inputs = example_inputs_for(model) if inferred else _as_kwargs(model, example_inputs)
    if dtype != "fp32":
        model = copy.deepcopy(model).to(DTYPES[dtype])
        inputs = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in inputs.items()}
    seq_names = _sequence_inputs(inputs) - ({"attention_mask"} if decoder else set())
    default_atol, default_rtol = TOLERANCE[dtype]
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol

    job = _Job(model, program, path, inputs, seq_names, opset, decomposition, converted_count,
               external_data, functions, verify, atol, rtol, dtype, decoder=decoder)  # fmt: skip
    if decoder is not None:
        plans = [_Shapes("dynamic", set(inputs), seq_names, decoder_shapes(decoder))]
    elif program is not None or dynamic is False:
        plans = [_Shapes("static", set(), set())]
    elif dynamic is True or not seq_names:
        plans = [_Shapes("dynamic", set(inputs), seq_names)]
    else:
        plans = [_Shapes("dynamic", set(inputs), seq_names)]
    if dynamic is None and program is None and decoder is None:  # fallbacks: batch only, none
        if seq_names:
            plans.append(_Shapes("dynamic batch, static sequence", set(inputs), set()))
        plans.append(_Shapes("static", set(), set()))

    # An exported program's module has no train/eval modes: its graph fixed them.
    mode = contextlib.nullcontext() if program is not None else eval_mode(model)
    # keep_custom_op: the tracer sees serfswap::serf, which the translation table maps to the
    # exact pattern; outside it, tracers get Serf's ATen ops (serf.py says why).
    with _without_kv_cache(model), mode, keep_custom_op():
        output = _run_once(model, inputs, positional=program is not None)
        job.output_names = _output_names(model, output)
        failures: list[str] = []
        for number, shapes in enumerate(plans):
            try:
                report = job.attempt(shapes)
            except _AttemptFailed as failed:
                failures.append(f"{shapes.label} failed: {failed.reason}")
                if number == len(plans) - 1:
                    dynamic_plan = bool(shapes.batch or shapes.sequence)
                    raise failed.error_with(failures[:-1], dynamic=dynamic_plan) from None
                continue
            if failures:
                report.fallback = "; ".join(failures) + f"; exported with {shapes.label} shapes"
            break
    return report
