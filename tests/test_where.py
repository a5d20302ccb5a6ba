"""The one format of a site's location, ``file:line in method``: the plan shows it, the merge of
the run-time audit compares the static walk's with the audit's by it."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from serfswap.rewrite import audit as run_time
from serfswap.rewrite.functional import class_call_sites
from serfswap.rewrite.where import line_of, same_line, where


class _Calls(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.relu(x)


def test_where_reads_back_what_it_writes() -> None:
    text = where("/site-packages/transformers/modeling_mamba.py", 274, "Mamba.forward")
    assert text == "modeling_mamba.py:274 in Mamba.forward"
    assert line_of(text) == "modeling_mamba.py:274"
    assert same_line(text, "modeling_mamba.py:274 in mamba_selective_scan")  # a helper's name
    assert not same_line(text, "modeling_mamba.py:275 in Mamba.forward")
    assert not same_line("", "")  # no location names no line


def test_static_and_run_time_locations_agree() -> None:
    """The walk reads the call from source, the audit sees it run: one text, so the merge
    knows them for one site."""
    (site,) = class_call_sites(_Calls)
    line = inspect.getsourcelines(_Calls.forward)[1] + 1
    static = where(site.file, site.line, site.method)
    assert static == f"test_where.py:{line} in _Calls.forward"
    (ran,) = run_time.run(_Calls(), {"x": torch.randn(2, 3)}).ran
    assert ran.where == static
