"""``export_onnx(..., optimize=True)``: onnxruntime's transformer optimizer run on the exported
file, its Serf decompositions kept, checked against the file it came from.

Why: onnxruntime fuses each attention layer into its ``Attention`` op (and bias + GELU into
``BiasGelu``, an RMSNorm's ops into ``SimplifiedLayerNormalization``) only when the graph
matches its patterns, and not at session load. Add + LayerNorm into ``SkipLayerNormalization``
is left out: on onnxruntime's CPU it cost more than the attention fusion gained. The dynamo
export's attention mask matched none of them;
:func:`serfswap.onnx_ops.attention_mask.classic_attention_mask` rewrites it first.

What comes out is onnxruntime's own format: the fused ops are in its ``com.microsoft`` domain,
which no other runtime reads, so this is an option and never the default.

Choices made here:

* the raw 2-D attention mask (``AttentionMaskFormat.AttentionMask``): the optimizer's BERT
  default turns the mask into the count of ones, which is right only for padding at the end;
* ``opt_level=0``: only the optimizer's Python fusions are written to the file; onnxruntime's
  own graph optimisations still run at session load, for the CPU the file runs on;
* the model type ``bert``, decoders included (:func:`settings_for` says why): onnxruntime 1.32
  fuses no attention of a transformers 5 decoder exported by torch's dynamo exporter (its GPT-2
  patterns are of the TorchScript export of transformers' older GPT-2), only its norms.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from ..errors import ExportFailedError
from .attention_mask import classic_attention_mask

MODEL_TYPES = ("bert", "gpt2")
MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib ops, the fused ones


@dataclass
class Optimized:
    """What the optimizer fused: op counts by type, and the attention masks rewritten first."""

    model_type: str
    fused: dict[str, int] = field(default_factory=dict)
    masks_rewritten: int = 0

    def __str__(self) -> str:
        fused = ", ".join(f"{k} x{v}" for k, v in self.fused.items()) or "nothing"
        return (
            f"  optimized for onnxruntime ({self.model_type}; its com.microsoft ops, "
            f"onnxruntime only): fused {fused}"
        )


def _quiet_optimizer() -> list[logging.Logger]:
    """onnxruntime's fusion modules log each fusion at INFO on their own loggers."""
    names = [n for n in logging.root.manager.loggerDict if n.startswith(("fusion", "onnx_model"))]
    loggers = [logging.getLogger(n) for n in names]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    return loggers


def optimize_model_proto(
    model: onnx.ModelProto, model_type: str = "bert", num_heads: int = 0, hidden_size: int = 0
) -> tuple[onnx.ModelProto, Optimized]:
    """The attention masks rewritten, then onnxruntime's transformer optimizer (Python fusions
    only); ``num_heads`` / ``hidden_size`` 0: found from the graph's reshapes."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r}: use one of {list(MODEL_TYPES)}")
    before = Counter(n.op_type for n in model.graph.node)  # the optimizer counts these too
    rewritten = classic_attention_mask(model)
    options = FusionOptions(model_type)
    options.use_raw_attention_mask(True)  # padding anywhere, not only at the end
    # SkipLayerNormalization cost more than the Attention fusion gains on onnxruntime's CPU
    # (MiniLM, batch 8: Attention alone 0.91x the unfused file, with SkipLayerNormalization
    # 1.02x; Serf exp-log 1.03x against 1.08x: benchmarks/RESULTS.md, issue #30)
    options.enable_skip_layer_norm = options.enable_bias_skip_layer_norm = False
    _quiet_optimizer()
    try:
        result = optimize_model(
            model, model_type=model_type, num_heads=num_heads, hidden_size=hidden_size,
            optimization_options=options, opt_level=0,
        )  # fmt: skip
    except Exception as exc:  # the optimizer raises plain exceptions of many kinds
        raise ExportFailedError(f"onnxruntime's transformer optimizer failed: {exc}") from None
    stats = result.get_fused_operator_statistics().items()
    fused = {k: v - before[k] for k, v in stats if v > before[k]}
    model = result.model
    domains = {o.domain for o in model.opset_import}
    if MS_DOMAIN not in domains and any(n.domain == MS_DOMAIN for n in model.graph.node):
        # as the optimizer's own save does: onnx's shape inference (the quantiser's) needs it
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    return model, Optimized(model_type, fused, rewritten)


def optimize_file(
    path: Path, model_type: str = "bert", num_heads: int = 0, hidden_size: int = 0
) -> Optimized:
    """:func:`optimize_model_proto` on the file at ``path``, rewritten in place (a side file of
    weights stays a side file), with ``serfswap.optimized`` in its ``metadata_props``."""
    from .value_info import strip_value_info

    side = any(f != path and f.name.startswith(path.name) for f in path.parent.iterdir())
    model, done = optimize_model_proto(onnx.load(str(path)), model_type, num_heads, hidden_size)
    strip_value_info(model)  # the optimizer's shape inference, written back: value_info.py
    model.metadata_props.add(key="serfswap.optimized", value=model_type)
    onnx.save(model, str(path), save_as_external_data=side, all_tensors_to_one_file=True,
              location=f"{path.name}.data")  # fmt: skip
    return done


def settings_for(model: object) -> tuple[str, int, int]:
    """The optimizer's model type, head count and width for a torch model: from a transformers
    config where there is one (0: found from the graph). The model type is ``bert`` for
    decoders too: onnxruntime 1.32's ``gpt2`` type fuses no more in their dynamo graphs (the
    same norms, no attention) and fails on transformers 5's GPT-2 (``IndexError`` in its
    Gemm post-processing, a Gemm without bias)."""
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 0)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    return "bert", int(heads or 0), int(hidden or 0)


__all__ = ["MODEL_TYPES", "Optimized", "optimize_file", "optimize_model_proto", "settings_for"]
