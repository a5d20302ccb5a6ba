"""HuggingFace model folders as files: the check that every file transformers may open in one
is a regular file, writing a converted model as a folder (with the original's other files), and
quiet progress bars while transformers reads or writes one."""

from __future__ import annotations

import contextlib
import json
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from torch import nn

from ..errors import InvalidArgumentError, ModelLoadError
from .paths import StrPath, check_input_path, check_output_folder, staged_output

# Index files of sharded weights: their weight_map names the files transformers opens.
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def check_folder_files(directory: Path) -> None:
    """Every file transformers may open in a model folder is a regular file, checked before
    it opens any: the folder's entries (links followed: a hub cache's point at its blobs), and
    every shard an index names, which must also be a plain name inside the folder. A FIFO
    would block ``open`` in native code, where neither Ctrl-C nor SIGTERM reaches Python."""
    for entry in sorted(directory.iterdir()):
        try:
            mode = entry.stat().st_mode
        except OSError:
            continue  # a dangling link: transformers reports a missing file itself
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise ModelLoadError(f"{entry}: not a regular file (a FIFO, device or socket)")
    for name in _INDEXES:
        index = directory / name
        if not index.is_file():
            continue
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise ModelLoadError(f"{index}: not a JSON object with a weight_map ({exc})") from None
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index}: weight_map is not an object")
        for shard in sorted(set(map(str, weight_map.values()))):
            parts = PurePosixPath(shard).parts
            if not parts or PurePosixPath(shard).is_absolute() or ".." in parts or "\\" in shard:
                raise ModelLoadError(f"{index} names {shard!r}, not a file inside the folder")
            check = directory.joinpath(*parts)
            try:
                regular = stat.S_ISREG(check.stat().st_mode)
            except OSError:
                raise ModelLoadError(f"{index} names {shard!r}, which is missing") from None
            if not regular:
                raise ModelLoadError(f"{index} names {shard!r}, which is not a regular file")


# Files of a model folder that save_pretrained writes anew (weights, their index, the config):
# never copied from the original folder. Everything else (tokenizer, sentence-transformers'
# modules.json and 1_Pooling/...) is the model's company and is copied.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".onnx")


def save_hf_folder(
    model: nn.Module, folder: StrPath, *, files_from: StrPath | None = None
) -> list[str]:
    """Write a converted transformers model as a HuggingFace folder (``save_pretrained``: its
    config says "serf" where the activations were converted, so ``from_pretrained`` after
    ``import serfswap`` rebuilds it), with the other files of ``files_from`` (the original
    folder: tokenizer, sentence-transformers modules) copied beside it. The folder is written
    in a staging folder and moved into place whole. Returns the names copied.
    """
    import shutil

    if not callable(getattr(model, "save_pretrained", None)):
        raise InvalidArgumentError(
            f"a HuggingFace folder needs a transformers model, not a {type(model).__name__}; "
            "write a serfswap checkpoint (a .safetensors file) instead"
        )
    source = check_input_path(files_from) if files_from is not None else None
    if source is not None and not source.is_dir():
        raise InvalidArgumentError(f"--files-from {files_from}: not a folder")
    copied = []
    with staged_output(check_output_folder(folder)) as staged:
        with no_progress_bars():
            model.save_pretrained(staged)
        for entry in sorted(source.iterdir()) if source is not None else []:
            name = entry.name
            weights = name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json")
            card = name == "README.md"  # the original's model card: not this model's
            if name.startswith(".") or weights or card or (staged / name).exists():
                continue
            if entry.is_dir():
                shutil.copytree(entry, staged / name)
            else:
                shutil.copy2(entry, staged / name)
            copied.append(name)
    return copied


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers draws a bar for loading a local folder's weights (an instant here): two
    stray lines on stderr for every command. Its warnings stay."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
