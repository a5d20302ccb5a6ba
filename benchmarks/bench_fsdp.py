"""Sharded recovery (FSDP2, ``fsdp=True``) at 1 and 2 ranks: the bytes each rank holds of the
student's parameters, gradients and AdamW moments, its peak resident memory, and the time of a
step. CPU, gloo, one thread per rank. Then the consolidated file, written twice: a tensor at a
time (``fsdp.save_consolidated``, what ``serfswap recover --fsdp`` does) and, as before it, the
whole state gathered into rank 0's memory then written (``fsdp.full_state_dict`` +
``save_checkpoint``): rank 0's peak resident memory during each, above what it held before
(the peak is reset before each write through /proc/self/clear_refs: Linux).

A LLaMA built from its config (random weights: memory and time do not depend on them), its
SiLUs swapped to Serf, recovered on random token batches (global batch 4 x 128 tokens, split
over the ranks). At 1 rank the run is unsharded (one process does not shard).

    python benchmarks/bench_fsdp.py                 # both, the table on stdout
    python benchmarks/bench_fsdp.py --hidden 1024 --layers 8
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def worker(args: argparse.Namespace) -> None:
    """One rank of the run: recover, then report this process's figures as one JSON line."""
    import torch.distributed as dist
    import transformers

    import serfswap

    torch.set_num_threads(1)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
        max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    teacher = transformers.LlamaForCausalLM(config).eval()
    student = serfswap.convert(teacher)
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, args.vocab, (4, 128), generator=g)} for _ in range(4)]
    start = time.perf_counter()
    result = serfswap.recover(student, teacher, data, steps=args.steps, fsdp=True,
                              progress=False)  # fmt: skip
    seconds = time.perf_counter() - start
    rank = int(os.environ.get("RANK", "0"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    writes = consolidated_writes(student, Path(args.report))
    if dist.is_initialized():
        dist.destroy_process_group()
    record = {"rank": rank, "params": sum(p.numel() for p in teacher.parameters()),
              "local_bytes": result.local_bytes, "peak_rss": peak,
              "step_s": seconds / args.steps, **writes}  # fmt: skip
    Path(args.report).with_suffix(f".{rank}.json").write_text(json.dumps(record))


def _status(field: str) -> int:
    """A /proc/self/status figure, in bytes."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024


def consolidated_writes(student: torch.nn.Module, base: Path) -> dict[str, int]:
    """The bytes this process's resident memory rose by, at its peak, while writing the
    consolidated file streaming, then gathered whole. Before each, the C allocator gives the
    memory it holds free back (malloc_trim), so that the rise is what the write needs and not
    what training left free. Rank 0's two files must be the same bytes."""
    import ctypes

    import serfswap
    from serfswap.recovery import fsdp

    rose = {}
    streamed = base.with_name(base.name + ".streamed.safetensors")
    gathered = base.with_name(base.name + ".gathered.safetensors")
    libc = ctypes.CDLL("libc.so.6")
    for kind in ("streamed", "gathered"):
        libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) back to the current
        before = _status("VmRSS")
        if kind == "streamed":
            fsdp.save_consolidated(student, streamed)
        else:
            state = fsdp.full_state_dict(student)
            if state is not None:
                serfswap.save_checkpoint(student, gathered, tensors=state)
            del state
        rose[f"write_{kind}"] = _status("VmHWM") - before
    if gathered.exists():
        assert streamed.read_bytes() == gathered.read_bytes(), "the two files differ"
    return rose


def launch(ranks: int, argv: list[str], report: Path) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={ranks}",
        __file__,
        "--worker",
        "--report",
        str(report),
        *argv,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env)  # fmt: skip
    return [json.loads(report.with_suffix(f".{r}.json").read_text()) for r in range(ranks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()
    if args.worker:
        return worker(args)
    argv = ["--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab",
            str(args.vocab), "--steps", str(args.steps)]  # fmt: skip
    mib = 2**20
    print(
        f"torch {torch.__version__}, CPU, gloo, 1 thread per rank; LLaMA hidden {args.hidden},"
        f" {args.layers} layers, vocab {args.vocab}; global batch 4 x 128, {args.steps} steps"
    )
    print("| ranks | params | weights+grads+AdamW per rank (MiB) | peak RSS per rank (MiB) |"
          " s/step | rank 0 RSS rise writing the file, streamed / gathered (MiB) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in (1, 2):
            records = launch(ranks, argv, Path(tmp) / f"r{ranks}")
            held = " / ".join(f"{sum(r['local_bytes'].values()) / mib:.1f}" for r in records)
            rss = " / ".join(f"{r['peak_rss'] / mib:.0f}" for r in records)
            step = max(r["step_s"] for r in records)
            first = records[0]
            write = f"{first['write_streamed'] / mib:.0f} / {first['write_gathered'] / mib:.0f}"
            print(f"| {ranks} | {records[0]['params'] / 1e6:.1f} M | {held} | {rss} | "
                  f"{step:.2f} | {write} |")  # fmt: skip


if __name__ == "__main__":
    main()
