"""Every transformers type that builds small (``tests/zoo/hf_all.py``), converted with the
run-time audit: the sweep's recorded classification (``tests/zoo/hf_all.jsonl``, the
hf-zoo table of docs/models.md) must still hold, and no conversion is partial without the report
saying so."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.support.probes import count_activation_calls

from .zoo import hf_all
from .zoo.check import prepare, tensors

transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")
serfswap = pytest.importorskip("serfswap")

RECORDED = hf_all.results()
TESTED = hf_all.tested(RECORDED)


def test_the_record_covers_the_types_of_the_release_it_was_swept_on() -> None:
    """On the transformers release the sweep ran on (the pinned one, constraints.txt), the
    table covers every type it registers. A newer release adds types: they are reported (run
    the sweep for them), not a failure of the README's test command; the recorded types must
    still exist, or the table describes models nobody can build."""
    swept = {r["transformers"] for r in RECORDED.values()}
    assert len(swept) == 1, f"the table mixes sweeps of transformers {sorted(swept)}"
    today = set(hf_all.types())
    gone = sorted(set(RECORDED) - today)
    assert not gone, f"recorded types transformers {transformers.__version__} lacks: {gone}"
    missing = sorted(today - set(RECORDED))
    if swept == {transformers.__version__}:
        assert not missing, f"run: python benchmarks/hf_zoo_sweep.py {' '.join(missing)}"
    elif missing:
        warnings.warn(
            f"transformers {transformers.__version__} has {len(missing)} types the sweep (on "
            f"{swept.pop()}) did not record: python benchmarks/hf_zoo_sweep.py "
            f"{' '.join(missing)}",
            stacklevel=1,
        )


@pytest.mark.slow
@pytest.mark.parametrize("model_type", TESTED)
def test_hf_all(model_type: str) -> None:
    recorded = RECORDED[model_type]
    model = prepare(hf_all.build(model_type))
    batch = hf_all.runnable_inputs(model)
    assert sorted(batch) == recorded["inputs"]
    if recorded["status"] == "nothing":
        with pytest.raises(serfswap.NothingToConvertError):
            serfswap.convert(model, activations="all", example_inputs=batch, audit=True)
        return
    converted = serfswap.convert(model, activations="all", example_inputs=batch, audit=True)
    report = converted.serfswap_report
    assert report.audited, report.audit_error
    left = sorted(hf_all.site_key(s) for s in report.left)
    assert left == sorted(hf_all.site_key(s) for s in recorded.get("left", [])), str(report)
    assert all(s.left for s in report.left)
    # Independently of the audit: every activation function the converted model still calls
    # belongs to a family the report names, as kept (positivity) or left.
    with torch.no_grad(), count_activation_calls() as calls:
        out = tensors(converted(**batch))
    named = {s.family for s in report.skipped} | {s.family for s in report.left}
    assert set(calls.seen) <= named, f"unreported calls {dict(calls.seen)}:\n{report}"
    assert out and all(torch.isfinite(t).all() for t in out if t.is_floating_point())


def test_every_type_not_converting_fully_says_why() -> None:
    """docs/models.md gives a reason for each type that runs but does not convert fully."""
    unexplained = sorted(
        t
        for t, row in RECORDED.items()
        if row["status"] in ("partial", "nothing") and t not in hf_all.WHY
    )
    assert not unexplained, f"add to tests/zoo/hf_all.py WHY: {unexplained}"
