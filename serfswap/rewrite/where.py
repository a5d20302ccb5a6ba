"""``file:line in method``: where a site is in model code, as the plan shows it.

Static reading (:mod:`serfswap.rewrite.functional`, :mod:`serfswap.rewrite.positivity`) and the
run-time audit (:mod:`serfswap.rewrite.audit`) both write these locations, and the merge of the
audit compares them to tell a call it saw run from one the static walk found: one format, built
and read here.
"""

from __future__ import annotations


def file_name(path: str) -> str:
    """The last part of a source path: what a location shows of the file."""
    return path.rsplit("/", 1)[-1]


def where(file: str, line: int, method: str) -> str:
    """``"modeling_mamba.py:274 in mamba_selective_scan"``; ``file`` is a path or a file name
    (only the name is kept)."""
    return f"{file_name(file)}:{line} in {method}"


def line_of(location: str) -> str:
    """The ``file:line`` part of a location from :func:`where`."""
    return location.split(" in ", 1)[0]


def same_line(a: str, b: str) -> bool:
    """Whether two locations from :func:`where` name the same line (an empty one names none)."""
    return bool(a) and line_of(a) == line_of(b)
