"""Causal language models in recovery: what makes a model one, the loss it is distilled with,
and the held-out figures a user of one judges it by.

A causal LM is used one next token at a time, so it is distilled on the next-token distribution
at every real position (KL with temperature, averaged over the positions the attention mask
keeps, padding left out) and judged by held-out perplexity next to the original's and by how
often its most likely next token is the original's (top-1 agreement), over real positions.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a decoder-only language model: a transformers model that can
    generate and is not an encoder-decoder (``LlamaForCausalLM``, ``GPT2LMHeadModel``,
    ``BertLMHeadModel``...). Masked LMs, encoders and classifiers cannot generate; seq2seq
    models generate from an encoder's input, whose tokens their logits do not predict.

    The one place that decides it: the loss (:func:`token_kl`), the evaluation
    (:func:`lm_sums`) and packing of text data (``serfswap recover``) all ask here."""
    can_generate = getattr(model, "can_generate", None)
    config = getattr(model, "config", None)
    if not callable(can_generate) or config is None:
        return False
    return bool(can_generate()) and not getattr(config, "is_encoder_decoder", False)


def token_kl(student: Tensor, teacher: Tensor, temperature: float,
             mask: Tensor | None = None) -> Tensor:  # fmt: skip
    """KL(teacher || student) of the next-token distributions at temperature ``temperature``,
    per position, averaged over the positions ``mask`` keeps (all when None) and scaled by T^2
    so that its gradients keep their size as T changes (Hinton et al.). ``student`` and
    ``teacher`` are ``[batch, positions, vocab]`` logits; a padded position counts for nothing,
    whatever its logits."""
    t = temperature
    log_p = F.log_softmax(teacher.float() / t, -1)
    log_q = F.log_softmax(student.float() / t, -1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1)
    if mask is None:
        return per_position.mean() * (t * t)
    keep = mask.to(per_position.device).bool()
    return per_position[keep].mean() * (t * t)


def lm_sums(student: Tensor, teacher: Tensor, input_ids: Tensor,
            mask: Tensor | None) -> dict[str, float]:  # fmt: skip
    """The sums over one batch that :func:`lm_metrics` turns into figures: negative
    log-likelihoods of the next tokens under the student and the teacher (``nll``,
    ``nll_original``, over ``tokens`` predicted positions: both the position and the token it
    predicts are real), top-1 agreement and KL at T=1 (``agree``, ``kl``, over ``positions``,
    the real ones)."""
    keep = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    s, t = student.float(), teacher.float()
    target = input_ids[:, 1:]
    predicted = keep[:, :-1] & keep[:, 1:]

    def nll(logits: Tensor) -> float:
        losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), target, reduction="none")
        return losses[predicted].sum().item()

    agree = (s.argmax(-1) == t.argmax(-1))[keep]
    positions = int(keep.sum())
    return {
        "nll": nll(s), "nll_original": nll(t), "tokens": float(predicted.sum()),
        "agree": agree.float().sum().item(), "positions": float(positions),
        "kl": token_kl(s, t, 1.0, keep).item() * positions,
    }  # fmt: skip


def lm_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Perplexities (exp of the mean next-token NLL over all predicted tokens, not a mean of
    per-batch perplexities), their ratio, top-1 agreement and KL per real position."""
    if not sums.get("positions"):
        return {}
    tokens = max(sums["tokens"], 1.0)
    ppl, original = math.exp(sums["nll"] / tokens), math.exp(sums["nll_original"] / tokens)
    return {
        "perplexity": ppl, "original_perplexity": original, "perplexity_ratio": ppl / original,
        "agreement": sums["agree"] / sums["positions"], "kl": sums["kl"] / sums["positions"],
    }  # fmt: skip


def input_ids_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """The token ids of a batch for ``model(*args, **kwargs)``."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, Tensor):
        from ..errors import InvalidArgumentError

        raise InvalidArgumentError("a causal LM's held-out batches need input_ids")
    return ids


def headline(before: dict[str, float], after: dict[str, float]) -> list[str]:
    """A causal LM's figures in its user's terms (see :func:`measures.headline`): with
    ``before``, ``perplexity 31.20 -> 28.90 (original 28.40, 1.018x)`` and ``next-token
    agreement with the original 0.780 -> 0.962``; without, one evaluation on one line,
    ``perplexity 31.20 (original 28.40, 1.099x), next-token agreement 0.780``."""
    if "perplexity" not in after:
        return []
    original = f"original {after['original_perplexity']:.2f}, {after['perplexity_ratio']:.3f}x"
    if "perplexity" not in before:
        return [f"perplexity {after['perplexity']:.2f} ({original}), next-token agreement "
                f"{after['agreement']:.3f}"]  # fmt: skip
    return [
        f"perplexity {before['perplexity']:.2f} -> {after['perplexity']:.2f} ({original})",
        f"next-token agreement with the original {before['agreement']:.3f} -> "
        f"{after['agreement']:.3f}",
    ]
