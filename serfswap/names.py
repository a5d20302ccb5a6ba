"""Lists of input, output and axis names written short: the names of a decoder's KV cache
(``past_key_values.0.key`` ... ``past_key_values.29.value``, 60 of them) become one entry,
``past_key_values.{0..29}.key/value``, so that a report fits on a screen.

Pure string work, no torch: the report of :func:`serfswap.export_onnx` uses it, and anything
else that lists names may.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_INDEX = re.compile(r"(?:(?<=\.)|^)(\d+)(?=\.|$)")  # a dotted part that is a number


def _indices(values: list[int]) -> str:
    """``{0..29}`` for a run of consecutive numbers, ``{0,2,5}`` otherwise."""
    if len(values) > 1 and values == list(range(values[0], values[-1] + 1)):
        return f"{{{values[0]}..{values[-1]}}}"
    return "{" + ",".join(map(str, values)) + "}"


def summarise(entries: Iterable[tuple[str, str]], sep: str = " ") -> list[str]:
    """``name detail`` strings (``sep`` between them), names that differ only by one number
    (with the same detail) folded into one ``{first..last}``, then names that differ only by
    their last dotted part (``.key`` / ``.value``) joined with ``/``. Order: where each group
    first appears.

    >>> summarise([("ids", "[2, 8]"), ("kv.0.key", "[2, 4]"), ("kv.0.value", "[2, 4]"),
    ...            ("kv.1.key", "[2, 4]"), ("kv.1.value", "[2, 4]")])
    ['ids [2, 8]', 'kv.{0..1}.key/value [2, 4]']
    """
    groups: dict[tuple[str, str], list[int]] = {}
    order: list[tuple[str, str] | tuple[str, str, None]] = []
    for name, detail in entries:
        match = _INDEX.search(name)
        if match is None:
            order.append((name, detail, None))
            continue
        template = name[: match.start()] + "{}" + name[match.end() :]
        key = (template, detail)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(int(match.group(1)))
    # key/value: templates equal but for their last dotted part, with the same numbers
    merged: dict[tuple[str, str, tuple[int, ...]], list[str]] = {}
    lines: list[tuple[str, str, tuple[int, ...]] | str] = []
    for item in order:
        if len(item) == 3:
            lines.append(_line(item[0], item[1], sep))
            continue
        template, detail = item
        numbers = groups[item]
        if len(numbers) == 1:
            lines.append(_line(template.replace("{}", str(numbers[0]), 1), detail, sep))
            continue
        head, dot, last = template.rpartition(".")
        stem = (head if dot and "{}" in head else template, detail, tuple(numbers))
        if stem not in merged:
            merged[stem] = []
            lines.append(stem)
        merged[stem].append(last if dot and "{}" in head else "")
    out = []
    for line in lines:
        if isinstance(line, str):
            out.append(line)
            continue
        stem, detail, numbers = line
        lasts = merged[line]
        name = stem.replace("{}", _indices(list(numbers)), 1)
        if lasts != [""]:
            name += "." + "/".join(lasts)
        out.append(_line(name, detail, sep))
    return out


def _line(name: str, detail: str, sep: str) -> str:
    return f"{name}{sep}{detail}" if detail else name
