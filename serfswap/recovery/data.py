"""Recovery data from files, for ``serfswap recover``: an image folder or a text file (JSON
lines, Parquet, Arrow and ``datasets`` folders are streamed by ``stream.py``).

Recovery needs no labels, only inputs the teacher can be asked about, so both readers yield
inputs only: image tensors prepared with the model's own timm transforms (from its
``pretrained_cfg``), or tokenised text as dicts for ``model(**batch)``. Each source is split,
with a fixed seed, into training batches and held-out batches for the before/after figures.
The training order is fixed by the seed, so a resumed run sees the batches the killed run
would have seen.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InvalidArgumentError, first_line, install_hint
from ..inputs import timm_channels
from ..io.remote_code import check_tokenizer_folder, never_ask

_TRUST_HINT = "If you trust the folder's code, pass --trust-remote-code"


@dataclass
class RecoveryData:
    """Training batches (re-iterable, same order every time) and held-out batches."""

    train: Any
    held_out: list[Any]
    description: str


def split(n: int, held_out: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices for training and held-out examples: a seeded shuffle, at least one of each;
    ``held_out`` is a share of ``n``, or from 1 up a count of examples."""
    if n < 2:
        raise InvalidArgumentError(f"need at least 2 examples to hold some out, found {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = min(n - 1, max(1, round(held_out if held_out >= 1 else n * held_out)))
    return order[k:], order[:k]


def images(folder: Path, model: nn.Module, batch_size: int, held_out: float,
           seed: int) -> RecoveryData:  # fmt: skip
    """An image folder (class subfolders or flat; labels are not used), prepared as the model
    expects: timm's eval transforms from the model's ``pretrained_cfg``."""
    try:
        from timm.data import ImageDataset, create_transform, resolve_data_config
    except ImportError:
        raise InvalidArgumentError(f"an image folder needs timm ({install_hint('timm')})") from None
    if not getattr(model, "pretrained_cfg", None):
        raise InvalidArgumentError(
            f"{type(model).__name__} has no timm pretrained_cfg to prepare images with; "
            "image folders work with timm models"
        )
    config = _data_config(resolve_data_config({}, model=model), timm_channels(model))
    mode = "L" if config["input_size"][0] == 1 else "RGB"
    try:
        dataset = ImageDataset(
            str(folder), input_img_mode=mode, transform=create_transform(**config)
        )
    except RuntimeError as exc:  # timm: "Found 0 images in subfolders of ..."
        raise InvalidArgumentError(f"{folder}: {exc}") from None
    if len(dataset) == 0:
        raise InvalidArgumentError(f"{folder}: no images")
    train, test = split(len(dataset), held_out, seed)

    def loader(indices: list[int], shuffle: bool) -> torch.utils.data.DataLoader:
        generator = torch.Generator().manual_seed(seed)  # re-created: same order each run
        return torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, indices), batch_size=batch_size, shuffle=shuffle,
            generator=generator, collate_fn=_inputs_only,
        )  # fmt: skip

    size = "x".join(map(str, config["input_size"]))
    return RecoveryData(
        loader(train, True),
        list(loader(test, False)),
        f"{len(dataset)} images from {folder} at {size}{' (grayscale)' if mode == 'L' else ''} "
        f"({len(train)} train, {len(test)} held out)",
    )


def _data_config(config: dict[str, Any], channels: int) -> dict[str, Any]:
    """timm's data config for a model that takes ``channels`` channels. The config comes from
    the model's ``pretrained_cfg``, which says 3 channels even for ``in_chans=1``: a 1-channel
    model reads the images as grayscale, normalised with the mean of the RGB means and stds
    (what a grayscale pixel of the same scene averages to). Other counts have no image mode."""
    if channels == config["input_size"][0]:
        return config
    if channels != 1:
        raise InvalidArgumentError(
            f"the model takes {channels} input channels; an image folder gives 1 (grayscale) "
            "or 3 (RGB)"
        )
    return {
        **config,
        "input_size": (1, *config["input_size"][1:]),
        "mean": (sum(config["mean"]) / len(config["mean"]),),
        "std": (sum(config["std"]) / len(config["std"]),),
    }


def _inputs_only(items: list[tuple[torch.Tensor, Any]]) -> torch.Tensor:
    return torch.stack([image for image, _ in items])


def texts(path: Path, tokenizer_dir: Path, batch_size: int, held_out: float, seed: int,
          max_length: int, *, trust_remote_code: bool = False,
          pack: bool = False) -> RecoveryData:  # fmt: skip
    """A text file, one example per line (blank lines skipped), tokenised with the model's
    own tokenizer into padded dict batches; with ``pack`` (causal LMs), packed instead into
    full rows of ``max_length`` tokens (:func:`pack_tokens`), so that no step is spent on
    padding."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise InvalidArgumentError(f"{path}: not UTF-8 text ({exc.reason})") from None
    lines = [line for line in lines if line]
    tokenizer = load_tokenizer(tokenizer_dir, trust_remote_code=trust_remote_code)
    train, test = split(len(lines), held_out, seed)
    random.Random(seed + 1).shuffle(train)  # a fixed order: resumable
    if pack:
        return _packed(tokenizer, lines, train, test, batch_size, max_length, path)

    def batches(indices: list[int], size: int) -> list[dict[str, torch.Tensor]]:
        return [
            tokenize(tokenizer, [lines[i] for i in indices[k : k + size]], max_length)
            for k in range(0, len(indices), size)
        ]

    return RecoveryData(
        batches(train, batch_size),
        batches(test, held_out_batch(batch_size)),
        f"{len(lines)} lines from {path} ({len(train)} train, {len(test)} held out)",
    )


def held_out_batch(batch_size: int) -> int:
    """The size of the held-out batches: at least 64, as neighbours are looked for within a
    batch (the nearest-neighbour agreement of embeddings)."""
    return max(batch_size, 64)


def tokenize(tokenizer: Any, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """One batch of ``texts`` as ``model(**batch)`` takes it: padded to the longest, cut at
    ``max_length`` tokens."""
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt"))  # fmt: skip


def load_tokenizer(tokenizer_dir: Path, *, trust_remote_code: bool = False) -> Any:
    """The model's own tokenizer from ``tokenizer_dir``. A tokenizer that needs its folder's
    own code is refused unless ``trust_remote_code`` (transformers would otherwise ask on
    stdin)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise InvalidArgumentError(
            f"a text file needs transformers ({install_hint('hf')})"
        ) from None
    check_tokenizer_folder(tokenizer_dir, _TRUST_HINT, trust_remote_code=trust_remote_code)
    never_ask()
    try:
        return AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        if not trust_remote_code and "trust_remote_code" in str(exc):
            raise InvalidArgumentError(
                f"the tokenizer in {tokenizer_dir} needs code from its folder; loading it runs "
                "that code. If you trust it, pass --trust-remote-code"
            ) from None
        raise InvalidArgumentError(
            f"no tokenizer in {tokenizer_dir} ({first_line(exc)}); pass --tokenizer DIR"
        ) from None


def _packed(tokenizer: Any, lines: list[str], train: list[int], test: list[int],
            batch_size: int, max_length: int, path: Path) -> RecoveryData:  # fmt: skip
    """The training and held-out lines, each packed into rows of ``max_length`` tokens."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise InvalidArgumentError(
            "packing text for a causal LM needs a tokenizer with an end-of-sequence token "
            "(eos_token or sep_token) to put between lines"
        )

    def rows(indices: list[int]) -> torch.Tensor:
        ids = tokenizer([lines[i] for i in indices], add_special_tokens=False)["input_ids"]
        return pack_tokens(ids, eos, max_length)

    train_rows, test_rows = rows(train), rows(test)
    return RecoveryData(
        packed_batches(train_rows, batch_size),
        packed_batches(test_rows, batch_size),
        f"{len(lines)} lines from {path} ({len(train)} train, {len(test)} held out), packed "
        f"into rows of {train_rows.shape[1]} tokens ({len(train_rows)} train, "
        f"{len(test_rows)} held out)",
    )


def pack_tokens(sequences: Iterable[Sequence[int]], eos_id: int, max_length: int) -> torch.Tensor:
    """Token sequences joined end to end, each followed by ``eos_id``, cut into rows of
    ``max_length``: a ``[rows, max_length]`` tensor with no padding, for causal LMs (a step on
    padded rows spends compute on positions that teach nothing; packed, every position is a
    next-token prediction). The tail that does not fill a row is dropped, unless there is no
    full row: then the one short row is all there is."""
    if max_length < 1:
        raise InvalidArgumentError(f"max_length={max_length}: must be >= 1")
    stream = [token for sequence in sequences for token in (*sequence, eos_id)]
    if not stream:
        raise InvalidArgumentError("no tokens to pack")
    full = len(stream) // max_length
    if full == 0:
        return torch.tensor([stream])
    return torch.tensor(stream[: full * max_length]).view(full, max_length)


def packed_batches(rows: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Packed rows (:func:`pack_tokens`) as dict batches for ``model(**batch)``, the attention
    mask all ones (every position is a real token)."""
    return [
        {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}
        for chunk in rows.split(batch_size)
    ]
