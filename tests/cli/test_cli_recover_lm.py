"""`serfswap recover` on a causal LM: the text is packed, and the user's figures (perplexity
next to the original's, next-token agreement) are printed before and after."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.cli import run
from tests.support.data import TEXT
from tests.support.models import tiny_llama

transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")


def test_recover_a_causal_lm_prints_perplexity_and_agreement(
    text_model: Path, tmp_path: Path, capsys
) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(text_model)
    folder = tmp_path / "llama"
    tiny_llama(vocab_size=len(tokenizer), initializer_range=0.3).save_pretrained(folder)
    data = tmp_path / "lines.txt"
    data.write_text(TEXT + "\n" + TEXT.lower())
    out = tmp_path / "llama.safetensors"
    code, stdout, err = run(capsys, "recover", str(folder), "--tokenizer", str(text_model),
                            "--data", str(data), "--steps", "3", "--batch-size", "2",
                            "--max-length", "16", "--lr", "1e-3", "-o", str(out))  # fmt: skip
    assert code == 0, err
    assert re.search(r"packed into rows of 16 tokens \(\d+ train, \d+ held out\)", stdout), stdout
    before = re.search(r"before recovery, perplexity ([\d.]+) \(original ([\d.]+), ([\d.]+)x\), "
                       r"next-token agreement ([\d.]+)", stdout)  # fmt: skip
    assert before, stdout
    after = re.search(r"perplexity ([\d.]+) -> ([\d.]+) \(original ([\d.]+), ([\d.]+)x\)", stdout)
    assert after, stdout
    assert after.group(1) == before.group(1) and after.group(3) == before.group(2)
    assert re.search(r"next-token agreement with the original [\d.]+ -> [\d.]+", stdout), stdout
    assert out.exists()
