"""torch -> ONNX with every Serf as standard ops, checked against torch before it is written.

Steps: infer example inputs when none are given (timm: ``pretrained_cfg["input_size"]``;
transformers: from the config and ``main_input_name``); export with the dynamo exporter, mapping
``serfswap::serf`` to the chosen decomposition; record serfswap's version, the decomposition and
the conversion counts in ``metadata_props``; ``onnx.checker`` (full check); count the Serf
decompositions and leftover activations; run onnxruntime on *fresh* inputs with another batch
size (and sequence length) than the export saw, so baked-in shapes fail here and not in
production; only then move the file into place. Everything is written in a temporary folder
beside the target, so a failed export leaves neither a partial nor a stale ``out.onnx``.

This module is the attempt pipeline: each exporter's shape plans in turn (``"auto"``: the
dynamo exporter's, then the TorchScript one's) until one exports and verifies. The decisions
before it are :mod:`.request`, the exporters :mod:`.writers`, the check :mod:`.verification`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ExportError, ExportFailedError, ExportMismatchError, first_line
from ..io.paths import staged_output
from ..modes import eval_mode
from ..onnx_ops.decompositions import choose
from ..ops.serf import keep_custom_op
from ..options import DEFAULT_DTYPE, DEFAULT_OPSET, DEFAULT_TASK, SEQ2SEQ_TASKS
from .failures import AttemptFailed, one_line
from .naming import output_names
from .optimize import optimize_staged
from .quantize import check_quantize, quantize_staged
from .report import ExportReport
from .request import Request, ShapePlan, prepare
from .seq2seq import Seq2SeqExportReport
from .switches import exportable_experts, without_kv_cache
from .verification import compare, fresh_like
from .writers import Written, write


def _run_once(model: nn.Module, inputs: dict[str, torch.Tensor], *, positional: bool) -> Any:
    """One forward in torch first: inputs the model rejects fail here, in one line that names
    them, instead of inside the exporter after pages of its log."""
    described = ", ".join(f"{k} {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}"
                          for k, v in inputs.items())  # fmt: skip
    try:
        with torch.no_grad():
            return model(*inputs.values()) if positional else model(**inputs)
    except Exception as exc:
        raise ExportError(
            f"the model fails on the example inputs ({described}): {first_line(exc)}"
        ) from None


def _inspect(req: Request, staged: Path, wrote: Written) -> ExportReport:
    """onnx.checker (full), the opset written, the graph's domains, functions and Serf count:
    the report of the staged file, with the paths it will have once in place."""
    import onnx

    from ..onnx_ops.graph import check_graph

    try:
        onnx.checker.check_model(str(staged), full_check=True)
    except Exception as exc:  # ValidationError, InferenceError
        raise AttemptFailed(f"onnx.checker: {one_line(exc)}", exc) from None
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


def _attempt(req: Request, exporter: str, shapes: ShapePlan) -> ExportReport:
    """Write, inspect and verify one exporter's shape plan in a staging folder; in place on
    success."""
    with staged_output(req.path, side_file=f"{req.path.name}.data") as staged:
        written = write(req, exporter, shapes, staged)
        report = _inspect(req, staged, written)
        report.exporter = exporter
        if written.deprecation:
            report.exporter_note = f"torch deprecates it: {written.deprecation}"
        fresh_sets = (
            [fresh_like(req.inputs, shapes.grow(), req.seq_names)]
            if req.decoder is None
            else req.decoder.verification_inputs()  # e.g. past lengths 0 and 7
        )
        if req.optimize:  # the verification below runs on the optimized file
            report.optimization = optimize_staged(req, staged, report.serf_nodes)
        if req.verify:
            for fresh in fresh_sets:  # the worst difference of each output over the sets
                try:
                    abs_diff, rel_diff = compare(
                        req.model, staged, fresh, req.atol, req.rtol,
                        positional=req.program is not None,
                    )  # fmt: skip
                except (ExportMismatchError, ExportFailedError) as exc:
                    raise AttemptFailed(str(exc), exc) from None
                for mine, new in ((report.max_abs_diff, abs_diff), (report.max_rel_diff, rel_diff)):
                    mine.update({k: max(v, mine.get(k, 0.0)) for k, v in new.items()})
            report.verified = True
        if req.quantize is not None:  # the verified fp32 file becomes its int8 quantisation
            quantize_staged(staged, req.quantize, fresh_sets, report)
    return report


def _attempts(req: Request) -> ExportReport:
    """Try each exporter's shape plans in turn; the first that exports and verifies is
    written, and the report says why the ones before failed."""
    failures: list[tuple[str, str, str]] = []  # exporter, shape plan, why it failed
    tries = [(exporter, shapes) for exporter in req.exporters for shapes in req.plans]
    for number, (exporter, shapes) in enumerate(tries):
        try:
            report = _attempt(req, exporter, shapes)
        except AttemptFailed as failed:
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


def export_onnx(
    model: nn.Module | torch.export.ExportedProgram,
    path: str | os.PathLike[str],
    example_inputs: Any = None,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic: bool | None = None,
    dtype: str = DEFAULT_DTYPE,
    decomposition: str | None = None,
    target: str | None = None,
    quantize: str | None = None,
    optimize: bool = False,
    verify: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    convert_activations: bool = False,
    external_data: bool | None = None,
    functions: bool = False,
    task: str = DEFAULT_TASK,
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
        decomposition: ``"softplus"`` (Softplus, Erf, Mul; the default) or ``"exp-log"``
            (Exp, Add, Log, Erf, Mul: faster on onnxruntime's CPU).
        target: ``"cpu"`` or ``"cuda"``: where the file will run; picks the faster exact
            decomposition there (``exp-log`` on CPU, ``softplus`` on CUDA) when
            ``decomposition`` is not given (:data:`serfswap.onnx_ops.decompositions.TARGETS`).
        quantize: ``"int8"``: write the file dynamically quantised (int8 weights, per channel;
            ``"int8-per-tensor"``), measured against the verified fp32 export
            (:mod:`serfswap.export.quantize`).
        optimize: run onnxruntime's transformer optimizer on the file (its ``Attention``,
            ``SkipLayerNormalization``... in onnxruntime's ``com.microsoft`` domain: the file is
            then for onnxruntime only), the attention mask first rewritten into a form it
            fuses; Serf kept, the file checked against the unoptimized one on padded masks and
            verified against torch (:mod:`serfswap.export.optimize`).
        verify: check with onnxruntime against torch on fresh inputs of another batch size
            (:func:`verify_onnx`).
        atol, rtol: verification tolerances (default: 1e-4 for fp32, 2e-2 for fp16).
        convert_activations: convert the model's activations to Serf first (a copy); without
            it, a model is exported as it is and the report counts what is left.
        external_data: weights in a side file ``<path>.data``; default: only above 2 GB, the
            protobuf limit (``False`` is refused there). Keep the two files together; a side
            file an earlier export left at ``path`` goes when the new file has none.
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
    try:
        decomposition = choose(decomposition, target)
    except ValueError as exc:
        raise ExportError(str(exc), option="target" if target else "decomposition") from None
    check_quantize(quantize)
    options = dict(
        opset=opset, dynamic=dynamic, dtype=dtype, decomposition=decomposition, verify=verify,
        atol=atol, rtol=rtol, convert_activations=convert_activations,
        external_data=external_data, functions=functions, exporter=exporter,
    )  # fmt: skip
    if task in SEQ2SEQ_TASKS:  # three files in a folder (export/seq2seq.py)
        if quantize is not None or optimize:
            what = "quantize=" if quantize is not None else "optimize="
            raise ExportError(f"{what} is for one-file exports, not task {task!r} yet")
        from .seq2seq import export_seq2seq

        return export_seq2seq(model, path, example_inputs, task=task, **options)
    report = _export(
        prepare(
            model, path, example_inputs, task=task, quantize=quantize, optimize=optimize, **options
        )
    )
    report.target = target
    return report


def _export(req: Request) -> ExportReport:
    """The prepared request's export: the attempts, with the model in the switches they need."""
    # An exported program's module has no train/eval modes: its graph fixed them.
    mode = contextlib.nullcontext() if req.program is not None else eval_mode(req.model)
    # keep_custom_op: the tracer sees serfswap::serf, which the translation table maps to the
    # exact pattern; outside it, tracers get Serf's ATen ops (serf.py says why).
    with (
        without_kv_cache(req.model),
        exportable_experts(req.model) as experts,
        mode,
        keep_custom_op(),
    ):
        output = _run_once(req.model, req.inputs, positional=req.program is not None)
        req.output_names = output_names(req.model, output)
        report = _attempts(req)
    if experts:
        note = "mixture-of-experts computed as batched_mm: grouped_mm has no ONNX form"
        report.exporter_note = "; ".join(filter(None, [report.exporter_note, note]))
    return report
