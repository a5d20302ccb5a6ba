"""``serfswap generate OUTDIR ...`` for a folder exported with a seq2seq task: each PROMPT is
the encoder's input (text through the tokenizer, or for Whisper a WAV file through the feature
extractor), and the decoder's output is printed, one line per prompt."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError, first_line


def read_wav(path: Path, rate: int) -> np.ndarray:
    """A 16-bit PCM WAV file as float samples in [-1, 1] (channels averaged). The file must be
    at the feature extractor's rate: resampling is the user's tool's job (``ffmpeg -ar``)."""
    import wave

    from ..io.paths import check_input_path

    check_input_path(path)
    try:
        with wave.open(str(path), "rb") as audio:
            width, channels = audio.getsampwidth(), audio.getnchannels()
            found = audio.getframerate()
            frames = audio.readframes(audio.getnframes())
    except (OSError, EOFError, wave.Error) as exc:
        raise InvalidArgumentError(f"{path}: not a WAV file ({exc})") from None
    if width != 2:
        raise InvalidArgumentError(f"{path}: {8 * width}-bit samples; give 16-bit PCM")
    if found != rate:
        raise InvalidArgumentError(
            f"{path}: {found} Hz; the feature extractor takes {rate} Hz (resample it, e.g. "
            f"ffmpeg -i {path.name} -ar {rate} out.wav)"
        )
    samples = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0
    return samples.reshape(-1, channels).mean(axis=1)


def _features(directory: Path, prompts: list[str], trust_remote_code: bool) -> np.ndarray:
    from transformers import AutoFeatureExtractor

    try:
        extractor = AutoFeatureExtractor.from_pretrained(
            directory, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(
            f"no feature extractor in {directory} ({first_line(exc)})"
        ) from None
    rate = int(extractor.sampling_rate)
    audio = [read_wav(Path(prompt), rate) for prompt in prompts]
    return extractor(audio, sampling_rate=rate, return_tensors="np")["input_features"]


def generate_from_folder(
    args: argparse.Namespace, folder: Path, tokenizer_for: Callable[[Path, bool], Any]
) -> int:
    """Greedy generation with the seq2seq export in ``folder``; prints one line per prompt."""
    from ..runtime.seq2seq import generate_seq2seq, load

    sessions = load(folder)
    directory = Path(args.tokenizer) if args.tokenizer is not None else folder
    tokenizer = tokenizer_for(directory, args.trust_remote_code)
    if sessions.speech:
        tokens = generate_seq2seq(
            sessions,
            _features(directory, args.prompts, args.trust_remote_code),
            max_new_tokens=args.max_new_tokens,
        )
    else:
        batch = tokenizer(args.prompts, padding=True, return_tensors="np")
        tokens = generate_seq2seq(
            sessions, batch["input_ids"], batch["attention_mask"],
            max_new_tokens=args.max_new_tokens,
        )  # fmt: skip
    for row in tokens:
        print(tokenizer.decode(row, skip_special_tokens=True))
    return 0
