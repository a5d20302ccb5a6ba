"""Greedy generation on onnxruntime with a ``text-generation-with-past`` file.

The loop is transformers' greedy ``generate`` step for step, so the tokens are the torch
model's: the first step feeds the whole (left-padded) prompt with an empty cache, every later
step one token per row and the previous step's ``present.*`` as ``past_key_values.*``;
positions count the real tokens before each one (padding does not count), as transformers does.
A row that has produced ``eos_token_id`` is continued with ``pad_token_id`` (default: the eos)
and generation stops when every row has finished.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InvalidArgumentError
from ..names import ATTENTION_MASK, INPUT_IDS, LOGITS, PAST, POSITION_IDS, is_past, present_for
from ..options import TEXT_GENERATION_WITH_PAST

if TYPE_CHECKING:
    import onnxruntime

_ONNX_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                "tensor(double)": np.float64}  # fmt: skip


def as_int64(value: Any, what: str) -> np.ndarray:
    """Token ids (a tensor, array or list; one row or a batch) as an int64 (batch, length) array,
    or one line saying what was given instead."""
    array = np.asarray(value.numpy() if hasattr(value, "numpy") else value)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer) or array.shape[1] == 0:
        raise InvalidArgumentError(
            f"{what} must be integer token ids of shape (batch, length), got {array.dtype} "
            f"{array.shape}"
        )
    return array.astype(np.int64)


def _session(session_or_path: Any) -> onnxruntime.InferenceSession:
    if isinstance(session_or_path, str | os.PathLike):
        from .session import session

        return session(session_or_path, "cpu")
    return session_or_path


def _empty_cache(sess: onnxruntime.InferenceSession, batch: int) -> dict[str, np.ndarray]:
    """Zero-length past tensors, with the heads and head size the graph declares."""
    cache = {}
    for value in sess.get_inputs():
        if is_past(value.name):
            _, heads, _, head_dim = value.shape
            dtype = _ONNX_FLOATS.get(value.type, np.float32)
            cache[value.name] = np.zeros((batch, heads, 0, head_dim), dtype=dtype)
    if not cache:
        raise InvalidArgumentError(
            f"the graph has no {PAST} inputs: export it with --task "
            f"{TEXT_GENERATION_WITH_PAST} (task={TEXT_GENERATION_WITH_PAST!r})"
        )
    return cache


def generate(
    session_or_path: onnxruntime.InferenceSession | str | os.PathLike[str],
    input_ids: Any,
    attention_mask: Any = None,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> np.ndarray:
    """Greedy generation with the KV cache; returns prompt and new tokens, (batch, length).

    Args:
        session_or_path: an onnxruntime session or the path of a file exported with
            ``task="text-generation-with-past"``; or a folder exported with a seq2seq task
            (or :func:`serfswap.runtime.seq2seq.load`'s sessions), which
            :func:`~serfswap.runtime.seq2seq.generate_seq2seq` runs: the encoder's inputs
            (token ids, or Whisper's log-mel features) in, the decoder's tokens out.
        input_ids: (batch, length) token ids (numpy, torch or nested lists); rows of different
            lengths are left-padded, with ``attention_mask`` 0 on the padding.
        attention_mask: default: all ones.
        max_new_tokens: how many tokens to add at most.
        eos_token_id: one id or several; a row stops at the first one it produces.
        pad_token_id: what a finished row is continued with; default: the (first) eos id.
    """
    from .seq2seq import Seq2SeqSessions, generate_seq2seq

    if isinstance(session_or_path, Seq2SeqSessions) or (
        isinstance(session_or_path, str | os.PathLike) and os.path.isdir(session_or_path)
    ):  # an encoder-decoder folder (seq2seq.py): input_ids may be Whisper's features
        return generate_seq2seq(
            session_or_path, input_ids, attention_mask, max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        )  # fmt: skip
    if type(max_new_tokens) is not int or max_new_tokens < 0:
        raise InvalidArgumentError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    tokens = as_int64(input_ids, INPUT_IDS)
    mask = np.ones_like(tokens) if attention_mask is None else as_int64(attention_mask, "mask")
    if mask.shape != tokens.shape:
        raise InvalidArgumentError(f"attention_mask {mask.shape} != input_ids {tokens.shape}")
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    sess = _session(session_or_path)
    names = [value.name for value in sess.get_inputs()]
    outputs = [value.name for value in sess.get_outputs()]
    feed: dict[str, np.ndarray] = _empty_cache(sess, tokens.shape[0])
    # transformers' positions: real tokens before each one; padding sits at 0
    positions = np.where(mask == 0, 0, np.cumsum(mask, axis=-1) - 1)
    step_ids, finished = tokens, np.zeros(tokens.shape[0], dtype=bool)
    for _ in range(max_new_tokens):
        feed.update({INPUT_IDS: step_ids, ATTENTION_MASK: mask})
        if POSITION_IDS in names:
            feed[POSITION_IDS] = positions[:, -step_ids.shape[1] :]
        results = dict(zip(outputs, sess.run(outputs, feed), strict=True))
        chosen = results[LOGITS][:, -1, :].argmax(-1)
        chosen = np.where(finished, pad, chosen).astype(np.int64)
        tokens = np.concatenate([tokens, chosen[:, None]], axis=1)
        finished |= np.isin(chosen, eos)
        if finished.all():
            break
        step_ids = chosen[:, None]
        mask = np.concatenate([mask, np.ones_like(step_ids)], axis=1)
        positions = np.concatenate([positions, positions[:, -1:] + 1], axis=1)
        for name in feed:
            if is_past(name):
                feed[name] = results[present_for(name)]
    return tokens
