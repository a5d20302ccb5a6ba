"""Pickled names are a format: converted models saved whole by an earlier serfswap (the golden
files under tests/golden/, written before the #25 layout by ``tests/golden/make_golden.py``) load
with plain ``torch.load`` and with serfswap's safe loader, and compute what they computed then."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import serfswap
from serfswap.io.load import load_model
from tests.golden.make_golden import CASES, _output

GOLDEN = Path(__file__).parent / "golden"
# Files the safe loader refuses for names that are not serfswap's: the test's own model classes,
# and the forward hooks transformers' Mamba keeps (functools.partial-like _WrappedHook).
REFUSED = {"attribute": "tests.golden.models", "functional": "tests.golden.models",
           "hf_mamba": "torch.nn.modules.module._WrappedHook"}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("loader", ["torch.load", "safe"])
def test_a_golden_pickle_loads_and_computes_what_it_did(name: str, loader: str) -> None:
    expected = torch.load(GOLDEN / f"{name}.expected.pt", weights_only=True)
    if loader == "torch.load":
        model = torch.load(GOLDEN / f"{name}.pt", weights_only=False)
    elif name in REFUSED:
        with pytest.raises(serfswap.ModelLoadError, match=REFUSED[name]) as refused:
            load_model(str(GOLDEN / f"{name}.pt"))
        assert "serfswap." not in str(refused.value)  # none of ours is what it refuses
        model = load_model(str(GOLDEN / f"{name}.pt"), trust_pickle=True).model
    else:
        model = load_model(str(GOLDEN / f"{name}.pt")).model
    report = model.serfswap_report
    assert sorted({s.kind for s in report.sites}) == expected["kinds"]
    torch.testing.assert_close(_output(model, expected["inputs"]), expected["output"],
                               rtol=0, atol=0)  # fmt: skip
    # the report still works as an object of today's code, and the model still reverts
    assert "serf" in report.summary().lower()
    reverted = serfswap.revert(model)
    assert not any(type(m).__name__ == "Serf" for m in reverted.modules())
