"""Code shipped with a HuggingFace folder never runs unless the user passed --trust-remote-code.

transformers runs a folder's own Python files when a config says where they are (``auto_map``,
``"AutoModel": "modeling_x.Net"``, or a hub form ``user/repo--modeling_x.Net`` that downloads
them). It checks ``trust_remote_code`` where it is passed, and *asks on stdin* where it is not,
which is the case for every nested load it makes itself: DETR's ``backbone_config`` goes through
``AutoBackbone.from_config``, a RAG tokenizer loads its ``question_encoder_tokenizer/`` folder,
and neither passes the caller's flag on. Anything piped into the command answers that question.

So serfswap does two things, both here:

* :func:`never_ask` makes transformers answer "no" without reading stdin, for the whole process
  (its ``TIME_OUT_REMOTE_CODE``, which transformers' own CI sets to 0 for the same purpose);
* :func:`refuse_remote_code` refuses, before transformers sees it, any config, sub-config,
  list item, tokenizer file or checkpoint field that carries ``auto_map`` or
  ``trust_remote_code``, at any depth; :func:`without_remote_code` strips them from what
  serfswap writes itself, so that its checkpoints never carry them.

Low in the layering (imports only the errors); transformers is imported only by
:func:`never_ask`.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError

# Keys that make transformers import a folder's (or the hub's) code, or ask whether it may.
REMOTE_CODE_KEYS = frozenset({"auto_map", "trust_remote_code"})
# How deep a tokenizer folder's sub-folders are read (RAG keeps one level of them).
_FOLDER_DEPTH = 3
# A JSON file a tokenizer folder holds (tokenizer.json of a large vocabulary is tens of MB).
_JSON_MAX_BYTES = 512 * 2**20


def never_ask() -> None:
    """Make transformers refuse remote code it was not told to trust, without a prompt.

    transformers asks ``Do you wish to run the custom code? [y/N]`` on stdin when a load is
    given no ``trust_remote_code`` and waits ``TIME_OUT_REMOTE_CODE`` seconds for an answer;
    with 0 it raises at once instead (``resolve_trust_remote_code``, the branch its CI uses).
    transformers has no environment variable for it, so serfswap sets the module attribute,
    which the function reads at each call. A load given ``trust_remote_code=True`` is unchanged.
    """
    try:
        from transformers import dynamic_module_utils
    except ImportError:  # no transformers: nothing can ask
        return
    dynamic_module_utils.TIME_OUT_REMOTE_CODE = 0


def find_remote_code(value: Any, *, skip_top: frozenset[str] = frozenset()) -> str | None:
    """The path (``backbone_config.auto_map``) of the first remote-code key in ``value``, a
    parsed JSON value or a dict of configs, at any depth; None when there is none.
    ``skip_top`` names top-level keys not to report (see :func:`refuse_remote_code`)."""
    pending: list[tuple[str, Any]] = [("", value)]
    while pending:  # iterative: a deeply nested file cannot exhaust Python's recursion
        where, node = pending.pop()
        if isinstance(node, dict):
            for key, item in node.items():
                path = f"{where}.{key}" if where else str(key)
                if key in REMOTE_CODE_KEYS and not (where == "" and key in skip_top):
                    return path
                pending.append((path, item))
        elif isinstance(node, list | tuple):
            pending.extend((f"{where}[{i}]", item) for i, item in enumerate(node))
    return None


def refuse_remote_code(value: Any, where: str, *, skip_top: frozenset[str] = frozenset(),
                       hint: str = "") -> None:  # fmt: skip
    """Raise ModelLoadError when ``value`` carries a remote-code key at any depth.

    ``skip_top``: top-level keys that are handled elsewhere (a model folder's own top-level
    ``auto_map`` is ignored by transformers when serfswap passes ``trust_remote_code=False``,
    which it does). ``hint``: how to go on (``--trust-remote-code`` where it applies)."""
    found = find_remote_code(value, skip_top=skip_top)
    if found is not None:
        raise ModelLoadError(
            f"{where}: {found} names code to import and run (remote code); refused unread"
            + (f". {hint}" if hint else "")
        )


def without_remote_code(value: Any) -> Any:
    """A copy of ``value`` (parsed JSON) with every remote-code key removed, at any depth:
    what serfswap writes into its own checkpoints."""
    if isinstance(value, dict):
        return {k: without_remote_code(v) for k, v in value.items() if k not in REMOTE_CODE_KEYS}
    if isinstance(value, list | tuple):
        return [without_remote_code(v) for v in value]
    return value


def check_tokenizer_folder(directory: Path, hint: str, *, trust_remote_code: bool = False) -> None:
    """Refuse a tokenizer folder when an entry of it or its sub-folders is not a regular file
    or folder (a FIFO would block the reader), or, unless ``trust_remote_code``, when any JSON
    file there (a RAG tokenizer's ``question_encoder_tokenizer/``) carries a remote-code key
    at any depth."""
    files = _json_files(directory, _FOLDER_DEPTH)
    if trust_remote_code:
        return
    for file in files:
        if file.stat().st_size > _JSON_MAX_BYTES:
            raise ModelLoadError(f"{file}: a JSON file over {_JSON_MAX_BYTES >> 20} MiB; refused")
        try:
            parsed = json.loads(file.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            continue  # not ours to judge: transformers reports files it cannot read
        refuse_remote_code(parsed, str(file), hint=hint)


def _json_files(directory: Path, depth: int) -> list[Path]:
    """The ``*.json`` files of ``directory`` and its sub-folders to ``depth`` levels, every
    entry checked to be a regular file or a folder first (links followed)."""
    found: list[Path] = []
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError:
        return found  # a missing folder: the loader reports it in its own words
    for entry in entries:
        path = Path(entry.path)
        try:
            mode = path.stat().st_mode
        except OSError:
            continue  # a dangling link: nothing to read
        if stat.S_ISDIR(mode):
            if depth > 1:
                found += _json_files(path, depth - 1)
        elif not stat.S_ISREG(mode):
            raise ModelLoadError(f"{path}: not a regular file (a FIFO, device or socket); refused")
        elif entry.name.endswith(".json"):
            found.append(path)
    return found
