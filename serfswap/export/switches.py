"""What an export switches in a transformers model's configs for its duration, and back after:
the KV cache off (a cache object is no ONNX output), mixture-of-experts layers computed with
batched matmuls (``grouped_mm`` has no ONNX form)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn


def _configs(model: nn.Module) -> list[Any]:
    """Every transformers config in the model, once each: submodules may hold their own (T5's
    decoder stack) or share the root's."""
    found = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    return list(found.values())


@contextlib.contextmanager
def without_kv_cache(model: nn.Module) -> Iterator[None]:
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
def exportable_experts(model: nn.Module) -> Iterator[bool]:
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
