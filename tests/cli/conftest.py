"""Fixtures the CLI's recover tests share (test_cli_recover.py, test_cli_recover_runs.py): a
folder of real images and a small BERT with its tokenizer, built once per module."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.support.data import TEXT
from tests.support.models import tiny_bert_config


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real images: scikit-learn's digits as PNG files in class subfolders."""
    datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn is in [dev]")
    from PIL import Image

    root = tmp_path_factory.mktemp("digits")
    data = datasets.load_digits()
    for i in range(40):
        folder = root / str(data.target[i])
        folder.mkdir(exist_ok=True)
        pixels = (data.images[i] * 15).astype("uint8")
        Image.fromarray(pixels).resize((32, 32)).convert("RGB").save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def text_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small BERT saved as a HuggingFace directory with a real WordPiece tokenizer (a few
    hundred words, written here: no download)."""
    transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")
    root = tmp_path_factory.mktemp("bert")
    words = sorted({w.strip(".,").lower() for w in TEXT.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizerFast(str(root / "vocab.txt"))
    tokenizer.save_pretrained(root)
    config = tiny_bert_config(
        vocab_size=len(vocab), num_hidden_layers=2, intermediate_size=64,
        max_position_embeddings=64, initializer_range=0.3,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(root)
    return root
