"""Greedy generation on onnxruntime with an encoder-decoder folder in Optimum's seq2seq layout
(``--task text2text-generation-with-past`` or ``automatic-speech-recognition-with-past``).

The loop is transformers' greedy ``generate`` for encoder-decoders, step for step: the encoder
runs once (``encoder_model.onnx``); the decoder starts from ``decoder_start_token_id`` (or the
prefix given, e.g. Whisper's language and task tokens) with ``decoder_model.onnx``, which also
returns the cross-attention keys and values; every later step feeds one token per row to
``decoder_with_past_model.onnx`` with the cache. A row that has produced ``eos_token_id`` is
continued with ``pad_token_id``, and generation stops when every row has finished.

The generation config's token rules apply as transformers applies them: ``forced_bos_token_id``
(the first new token), ``forced_eos_token_id`` (the last one that ``max_new_tokens`` allows),
``suppress_tokens`` and ``begin_suppress_tokens``; nothing else does (no beam search, no
repetition penalties, no Whisper timestamps): greedy only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InvalidArgumentError
from ..names import PRESENT, past_for
from .generate import as_int64

if TYPE_CHECKING:
    import onnxruntime

ENCODER_FILE = "encoder_model.onnx"
DECODER_FILE = "decoder_model.onnx"
WITH_PAST_FILE = "decoder_with_past_model.onnx"


def is_seq2seq_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder with the three files of a seq2seq export."""
    folder = Path(path)
    return folder.is_dir() and all(
        (folder / name).is_file() for name in (ENCODER_FILE, DECODER_FILE, WITH_PAST_FILE)
    )


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@dataclass(frozen=True)
class TokenRules:
    """The generation config's rules on which token may come where (transformers' logits
    processors of the same names)."""

    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | list[int] | None = None
    suppress_tokens: list[int] | None = None
    begin_suppress_tokens: list[int] | None = None

    def apply(self, logits: np.ndarray, *, length: int, prefix: int, last: bool) -> np.ndarray:
        """``logits`` (batch, vocab) of the token at decoder position ``length`` (the tokens
        so far), after a ``prefix`` of given tokens; ``last``: the last step allowed."""
        logits = logits.copy()
        if self.suppress_tokens:
            logits[:, self.suppress_tokens] = -np.inf
        begin = prefix + (1 if prefix == 1 and self.forced_bos_token_id is not None else 0)
        if self.begin_suppress_tokens and length == begin:
            logits[:, self.begin_suppress_tokens] = -np.inf
        forced = None
        if length == 1 and self.forced_bos_token_id is not None:
            forced = [self.forced_bos_token_id]
        elif last and self.forced_eos_token_id is not None:
            eos = self.forced_eos_token_id
            forced = [eos] if isinstance(eos, int) else list(eos)
        if forced:  # every forced id at 0, the rest at -inf: the argmax takes the first
            logits[:] = -np.inf
            logits[:, forced] = 0.0
        return logits


@dataclass
class Seq2SeqSessions:
    """The folder's three onnxruntime sessions and the token ids its configs name.

    Made once by :func:`load` and reused across calls: a session takes longer to make than a
    short generation takes to run."""

    encoder: onnxruntime.InferenceSession
    decoder: onnxruntime.InferenceSession
    with_past: onnxruntime.InferenceSession
    decoder_start_token_id: int | None
    eos_token_id: int | list[int] | None
    pad_token_id: int | None
    rules: TokenRules

    @property
    def speech(self) -> bool:
        """The encoder takes log-mel ``input_features`` (Whisper), not token ids."""
        return "input_features" in {value.name for value in self.encoder.get_inputs()}


def load(
    folder: str | os.PathLike[str], device: str = "cpu", *, threads: int | None = None
) -> Seq2SeqSessions:
    """Sessions for a seq2seq export in ``folder`` (on ``device``, with ``threads`` intra-op
    threads: :func:`serfswap.runtime.session`'s), with the ids of its ``config.json`` and
    ``generation_config.json`` (the latter wins where both name one)."""
    from .session import session

    path = Path(folder)
    if not is_seq2seq_folder(path):
        raise InvalidArgumentError(
            f"{folder} is not a seq2seq export: it needs {ENCODER_FILE}, {DECODER_FILE} and "
            f"{WITH_PAST_FILE} (serfswap export DIR OUT --task text2text-generation-with-past)"
        )
    config = _json(path / "config.json")
    config.update(
        {k: v for k, v in _json(path / "generation_config.json").items() if v is not None}
    )
    start = config.get("decoder_start_token_id")
    return Seq2SeqSessions(
        *(
            session(path / name, device, threads=threads)
            for name in (ENCODER_FILE, DECODER_FILE, WITH_PAST_FILE)
        ),
        decoder_start_token_id=start if start is not None else config.get("bos_token_id"),
        eos_token_id=config.get("eos_token_id"),
        pad_token_id=config.get("pad_token_id"),
        rules=TokenRules(**{name: config.get(name) for name in TokenRules.__dataclass_fields__}),
    )


def _features(value: Any, sessions: Seq2SeqSessions) -> np.ndarray:
    array = np.asarray(value.numpy() if hasattr(value, "numpy") else value)
    declared = sessions.encoder.get_inputs()[0].shape  # (batch, mel bins, frames)
    if array.ndim == 2:
        array = array[None]
    fixed = [d for d in declared[1:] if isinstance(d, int)]
    if (
        array.ndim != 3
        or not np.issubdtype(array.dtype, np.floating)
        or (len(fixed) == 2 and list(array.shape[1:]) != fixed)
    ):
        raise InvalidArgumentError(
            f"input_features must be log-mel features of shape (batch, {declared[1]}, "
            f"{declared[2]}), got {array.dtype} {array.shape}"
        )
    return array.astype(np.float32)


def _encode(sessions: Seq2SeqSessions, inputs: Any, attention_mask: Any) -> dict[str, np.ndarray]:
    """The encoder's output and mask, as the decoder takes them."""
    if sessions.speech:
        features = _features(inputs, sessions)
        (hidden,) = sessions.encoder.run(["last_hidden_state"], {"input_features": features})
        return {"encoder_hidden_states": hidden}
    ids = as_int64(inputs, "input_ids")
    mask = (
        np.ones_like(ids) if attention_mask is None else as_int64(attention_mask, "attention_mask")
    )
    if mask.shape != ids.shape:
        raise InvalidArgumentError(f"attention_mask {mask.shape} != input_ids {ids.shape}")
    (hidden,) = sessions.encoder.run(
        ["last_hidden_state"], {"input_ids": ids, "attention_mask": mask}
    )
    return {"encoder_hidden_states": hidden, "encoder_attention_mask": mask}


def _run(sess: onnxruntime.InferenceSession, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [value.name for value in sess.get_outputs()]
    wanted = {value.name for value in sess.get_inputs()}
    return dict(zip(names, sess.run(names, {k: v for k, v in feed.items() if k in wanted}),
                    strict=True))  # fmt: skip


def generate_seq2seq(
    folder_or_sessions: str | os.PathLike[str] | Seq2SeqSessions,
    inputs: Any,
    attention_mask: Any = None,
    *,
    max_new_tokens: int,
    decoder_input_ids: Any = None,
    decoder_start_token_id: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> np.ndarray:
    """Greedy generation with the KV cache; returns the decoder's tokens, (batch, length): the
    start token (or ``decoder_input_ids``) and the new ones, as transformers' ``generate``.

    Args:
        folder_or_sessions: a folder exported with a seq2seq task, or :func:`load`'s sessions.
        inputs: token ids (batch, length), padded with ``attention_mask`` 0 (any side); or,
            for a speech encoder, log-mel features (batch, mel bins, frames) as the model's
            feature extractor makes them.
        attention_mask: default: all ones (text only).
        max_new_tokens: how many tokens to add at most.
        decoder_input_ids: the decoder's prefix, (batch, length) or (length,) for every row;
            default: ``decoder_start_token_id``.
        decoder_start_token_id, eos_token_id, pad_token_id: default: the folder's
            ``generation_config.json`` / ``config.json``. A row stops at its first eos (one id
            or several) and is continued with the pad id (default: the first eos).
    """
    if type(max_new_tokens) is not int or max_new_tokens < 0:
        raise InvalidArgumentError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    sessions = (
        folder_or_sessions
        if isinstance(folder_or_sessions, Seq2SeqSessions)
        else load(folder_or_sessions)
    )
    encoded = _encode(sessions, inputs, attention_mask)
    batch = encoded["encoder_hidden_states"].shape[0]
    if decoder_input_ids is None:
        start = decoder_start_token_id
        start = sessions.decoder_start_token_id if start is None else start
        if start is None:
            raise InvalidArgumentError(
                "no decoder_start_token_id: the folder's configs name none; pass one"
            )
        tokens = np.full((batch, 1), start, dtype=np.int64)
    else:
        tokens = as_int64(decoder_input_ids, "decoder_input_ids")
        tokens = np.repeat(tokens, batch, axis=0) if tokens.shape[0] == 1 else tokens
        if tokens.shape[0] != batch:
            raise InvalidArgumentError(f"decoder_input_ids has {tokens.shape[0]} rows for {batch}")
    eos = eos_token_id if eos_token_id is not None else sessions.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    pad = pad_token_id if pad_token_id is not None else sessions.pad_token_id
    pad = pad if pad is not None else (eos[0] if eos else 0)
    finished = np.zeros(batch, dtype=bool)
    feed: dict[str, np.ndarray] = {**encoded, "input_ids": tokens}
    sess = sessions.decoder  # the first step: the whole prefix, no cache in
    prefix = tokens.shape[1]
    for step in range(max_new_tokens):
        results = _run(sess, feed)
        logits = sessions.rules.apply(results["logits"][:, -1, :], length=tokens.shape[1],
                                      prefix=prefix, last=step == max_new_tokens - 1)  # fmt: skip
        chosen = logits.argmax(-1)
        chosen = np.where(finished, pad, chosen).astype(np.int64)
        tokens = np.concatenate([tokens, chosen[:, None]], axis=1)
        finished |= np.isin(chosen, eos)
        if finished.all():
            break
        feed["input_ids"] = chosen[:, None]
        for name, value in results.items():  # decoder's every step, encoder's the first
            if name.startswith(PRESENT + "."):
                feed[past_for(name)] = value
        sess = sessions.with_past
    return tokens
