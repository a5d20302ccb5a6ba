"""serfswap loads what its users pickle: every zoo model, converted to Serf, saved with
``torch.save(model)`` and read back by the safe loader (no code from the file), equal to what was
saved (issue 24). Slow job; ``benchmarks/safe_load_zoo.py`` also counts the originals and the
per-family timm models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import serfswap
from serfswap.io import safe_pickle

from .zoo import hf_zoo, timm_zoo

timm = pytest.importorskip("timm", reason="timm is in the [timm] extra")
transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")

# Refused, and why: what such a file needs that the loader cannot admit without running code.
REFUSED = {
    "hf:gemma": "functools.partial",  # Gemma's embedding scale, a partial over a torch function
}
# torch.save(model) itself fails: the positional convolution's weight norm is a parametrization,
# which torch pickles only through state_dict() (serfswap's checkpoints are state dicts).
UNPICKLABLE = {"hf:wav2vec2", "hf:hubert"}
ZOO = [f"timm:{n}" for n in timm_zoo.TEST_MODELS] + [f"hf:{t}" for t in hf_zoo.MODELS]


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kind, _, which = name.partition(":")
    if kind == "timm":
        return timm.create_model(which, pretrained=False)
    config = hf_zoo.config(which)
    return transformers.AutoModel.from_config(config, attn_implementation="eager")


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_a_pickled_converted_zoo_model_loads_safely(name: str, tmp_path: Path) -> None:
    model = serfswap.convert(build(name).eval(), activations="all")
    path = tmp_path / "m.pt"
    if name in UNPICKLABLE:
        with pytest.raises(RuntimeError, match="parametrized modules"):
            torch.save(model, path)
        return
    torch.save(model, path)
    if name in REFUSED:
        with pytest.raises(safe_pickle.UnsafePickleError) as refused:
            safe_pickle.load(path)
        assert REFUSED[name] in ", ".join(refused.value.names) + str(refused.value)
        return
    loaded = safe_pickle.load(path)
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert [s.name for s in loaded.serfswap_report.converted] == [
        s.name for s in model.serfswap_report.converted
    ]
