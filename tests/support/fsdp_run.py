"""A recovery run of a tiny LLaMA in its own process, for the FSDP tests (launched with torchrun).

    python tests/support/fsdp_run.py OUT.safetensors --steps N [--fsdp [--fsdp-bf16]
                    [--activation-checkpointing]] [--teacher-dtype bf16] [--layer-weight W]
                    [--checkpoint-dir D --every K] [--resume] [--delay S] [--tied] [--gathered]

Teacher: a tiny LLaMA built from its config with a fixed seed (no download); data: a fixed list
of global batches of token ids, so that every run sees the same batches in the same order. Every
rank takes part in writing the student to OUT (``fsdp.save_consolidated``: rank 0 writes it a
tensor at a time); with ``--gathered`` also to OUT.gathered.safetensors the other way
(``fsdp.full_state_dict`` into rank 0's memory, then ``save_checkpoint``). Each rank writes the
bytes it held (``RecoveryResult.local_bytes``), its losses and its teacher's parameters' dtype
and local size to OUT.rankN.json. ``--tied``: the LM head tied to the token embeddings.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch
import torch.distributed as dist
import transformers

import serfswap
from serfswap.recovery import fsdp
from tests.support.recover_run import SlowBatches  # (run with the repository on PYTHONPATH)

VOCAB = 96


def config(tied: bool = False) -> Any:
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        initializer_range=0.2, tie_word_embeddings=tied,
    )  # fmt: skip


def models(tied: bool = False) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    teacher = transformers.LlamaForCausalLM(config(tied)).eval()
    return teacher, serfswap.convert(teacher)


def batches(n: int = 5, size: int = 4) -> list[dict[str, torch.Tensor]]:
    """Global batches without padding: every rank's slice has as many tokens, so the mean of
    the ranks' losses is the loss of the whole batch."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (size, 12), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--fsdp-bf16", action="store_true")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--layer-weight", type=float, default=1.0)
    parser.add_argument("--checkpoint-dir")
    parser.add_argument("--every", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--teacher-dtype")
    parser.add_argument("--tied", action="store_true")
    parser.add_argument("--gathered", action="store_true")
    parser.add_argument("--fit-batches", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    teacher, student = models(args.tied)
    result = serfswap.recover(
        student, teacher, SlowBatches(batches(), args.delay), steps=args.steps, lr=1e-3,
        fsdp=args.fsdp, fsdp_bf16=args.fsdp_bf16,
        activation_checkpointing=args.activation_checkpointing, layer_weight=args.layer_weight,
        checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.every, resume=args.resume,
        teacher_dtype=args.teacher_dtype, fit_batches=args.fit_batches, progress=False,
    )  # fmt: skip
    rank = int(os.environ.get("RANK", "0"))
    assert fsdp.save_consolidated(student, args.out) == (rank == 0)  # every rank takes part
    if args.gathered:
        state = fsdp.full_state_dict(student)
        if rank == 0:
            serfswap.save_checkpoint(student, f"{args.out}.gathered.safetensors", tensors=state)
    with open(f"{args.out}.rank{rank}.json", "w") as f:
        layer = [r["layer"] for r in result.history if "layer" in r]
        local = [p.to_local() if hasattr(p, "to_local") else p for p in teacher.parameters()]
        json.dump({"local_bytes": result.local_bytes, "layer": layer,
                   "loss": [r["loss"] for r in result.history],
                   "teacher": {"dtypes": sorted({str(p.dtype) for p in local}),
                               "numel": sum(p.numel() for p in local)}}, f)  # fmt: skip
    if dist.is_initialized():
        dist.barrier()  # rank 0 may still be writing the gathered file
        dist.destroy_process_group()
    print(f"done: {len(result.history)} steps, resumed from {result.resumed_from}")


if __name__ == "__main__":
    main()
