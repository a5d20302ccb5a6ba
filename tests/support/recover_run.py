"""A recovery run in its own process, for the tests that kill one or launch it with torchrun.

    python tests/support/recover_run.py OUT.safetensors --steps N [--checkpoint-dir D --every K]
                                [--resume] [--delay S]

Teacher: a tiny BERT classifier built from its config with a fixed seed (no download); data: a
fixed list of labelled global batches, so every run sees the same batches in the same order.
``--delay`` makes each batch slow to arrive (a slow data loader), so that a test can kill the
run between two checkpoints. Rank 0 writes the student's final weights to OUT.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator
from typing import Any

import torch
import transformers
from safetensors.torch import save_model

import serfswap


class SlowBatches:
    def __init__(self, batches: list[dict[str, torch.Tensor]], delay: float) -> None:
        self.batches, self.delay = batches, delay

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.batches:
            time.sleep(self.delay)
            yield batch


def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    config = transformers.BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=4,
        initializer_range=0.3,  # outputs far from uniform: the swap shows
    )  # fmt: skip
    torch.manual_seed(0)
    teacher = transformers.BertForSequenceClassification(config).eval()
    return teacher, serfswap.convert(teacher)


def batches(n: int = 6, size: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 128, (size, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[: size // 2, 9:] = 0  # some padding
        labels = torch.randint(0, 4, (size,), generator=g)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def main(argv: list[str] | None = None) -> Any:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--checkpoint-dir")
    parser.add_argument("--every", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--layer-weight", type=float, default=1.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    teacher, student = models()
    result = serfswap.recover(
        student, teacher, SlowBatches(batches(), args.delay), steps=args.steps, lr=1e-3,
        checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.every, resume=args.resume,
        layer_weight=args.layer_weight, progress=False,
    )  # fmt: skip
    if os.environ.get("RANK", "0") == "0":  # recover() has left the group by now
        save_model(student, args.out)
    print(f"done: {len(result.history)} steps, resumed from {result.resumed_from}")


if __name__ == "__main__":
    main()
