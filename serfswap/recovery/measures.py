"""What recovery gave back, said in the terms a user judges the model by, next to the original's.

The held-out evaluation (``distill.evaluate``) compares the student with the teacher; the
original (the teacher) evaluated against itself is the ceiling: agreement 1, cosine 1, and its
own accuracy where the batches carry labels. These lines put the figures before and after
recovery beside that ceiling: nearest-neighbour agreement and cosine for embedding models, top-1
agreement and accuracy for classifiers, perplexity next to the original's and next-token
agreement for causal LMs (:func:`lm.headline`).

Nearest-neighbour agreement depends on the pool searched: each held-out example's nearest
other example is looked for among the examples of its own held-out batch, and the larger the
pool, the closer the competitors and the harder it is to agree; the lines say the pool's size.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from . import lm
from .distill import split_batch


def pool_size(batches: list[Any]) -> int:
    """The examples in the largest held-out batch: the pool that nearest neighbours are
    searched in (0 without batches)."""
    sizes = []
    for batch in batches:
        args, kwargs, _ = split_batch(batch)
        first = next((v for v in (*args, *kwargs.values()) if isinstance(v, Tensor)), None)
        if first is not None and first.dim() > 0:
            sizes.append(first.shape[0])
    return max(sizes, default=0)


def headline(
    before: dict[str, float], after: dict[str, float], original: dict[str, float], pool: int
) -> list[str]:
    """One line per measure the user cares about: ``before -> after (original x)``; only
    ``after`` (and what else is given) when ``before`` is empty."""
    if not after:
        return []
    if "perplexity" in after:  # a causal LM: its own terms
        return lm.headline(before, after)
    lines = []
    if "kl" in after:  # a classifier
        lines.append(_line("top-1 agreement with the original", "agreement", before, after,
                           original, "{:.3f}"))  # fmt: skip
        if "accuracy" in after:
            lines.append(_line("accuracy", "accuracy", before, after, original, "{:.2%}"))
    elif "agreement" in after:  # embeddings
        agree = _line("nearest neighbours agree with the original's", "agreement", before, after,
                      original, "{:.3f}")  # fmt: skip
        lines.append(f"{agree}, each searched among the {pool} examples of a held-out batch")
    if "cosine" in after:
        what = "output" if "kl" in after else "embedding"
        lines.append(_line(f"{what} cosine to the original's", "cosine", before, after, original,
                           "{:.4f}"))  # fmt: skip
    return lines


def _line(label: str, key: str, before: dict[str, float], after: dict[str, float],
          original: dict[str, float], fmt: str) -> str:  # fmt: skip
    """``label: before -> after (original x)``, leaving out what was not measured."""
    text = f"{label}: "
    if key in before:
        text += fmt.format(before[key]) + " -> "
    text += fmt.format(after[key])
    if key in original:
        text += f" (original {fmt.format(original[key])})"
    return text
