"""Peak memory of an ONNX export against the size of the model's weights: ``export_onnx`` (or
``serfswap export --convert`` with ``--cli``) of a LLaMA built from its config, for the default
task and ``text-generation-with-past``, each in a process of its own.

One decoder layer and a large vocabulary (an untied embedding and head of ``vocab x hidden``
each carry nearly all the weights), so that a model past protobuf's 2 GB (which export_onnx
writes with its weights in a side file) builds and exports in a minute or two on a CPU. Per run:
the weights' bytes, the process's resident memory once the model is built (the baseline every
export starts from), its peak (the kernel's ``ru_maxrss`` of that child, from ``os.wait4``) and
the export's time.

    python benchmarks/bench_export_memory.py                    # 2.2 GB and 0.6 GB, both tasks
    python benchmarks/bench_export_memory.py --vocab 131072 --cli
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TASKS = ("default", "text-generation-with-past")


def _llama(vocab: int, hidden: int) -> Any:
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=256, num_hidden_layers=1,
        num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _rss() -> int:
    """This process's resident memory now, in bytes."""
    status = Path("/proc/self/status").read_text()
    return (
        int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))
        * 1024
    )


def worker(args: argparse.Namespace) -> None:
    """One export in this process; its figures as one JSON line on stdout (the peak is the
    parent's to read)."""
    import serfswap
    from serfswap.export.request import weight_bytes

    model = _llama(args.vocab[0], args.hidden)
    if args.save:  # the folder the --cli runs read
        model.save_pretrained(args.save)
        return
    model = serfswap.convert(model, inplace=True)
    before = _rss()
    start = time.perf_counter()
    report = serfswap.export_onnx(model, Path(args.out) / "m.onnx", task=args.task)
    seconds = time.perf_counter() - start
    record = {"weights": weight_bytes(model), "before": before, "seconds": seconds,
              "side_file": report.external_data is not None}  # fmt: skip
    print(json.dumps(record))


def _child(cmd: list[str]) -> tuple[str, int]:
    """Run ``cmd``; its stdout and its own peak resident memory in bytes."""
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = process.stdout.read() if process.stdout else ""
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({process.returncode})")
    return out, usage.ru_maxrss * 1024  # kB on Linux


def measure(args: argparse.Namespace, vocab: int, task: str, folder: Path) -> dict:
    out = folder / task
    out.mkdir()
    sizes = ["--vocab", str(vocab), "--hidden", str(args.hidden)]
    if args.cli:
        model = folder / "model"
        if not model.exists():
            _child([sys.executable, __file__, "--worker", "--save", str(model), *sizes])
        cmd = [sys.executable, "-m", "serfswap", "export", str(model), str(out / "m.onnx"),
               "--convert", "--task", task]  # fmt: skip
        start = time.perf_counter()
        _, peak = _child(cmd)
        weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        record = {"weights": weights, "before": None, "seconds": time.perf_counter() - start}
    else:
        cmd = [sys.executable, __file__, "--worker", "--task", task, "--out", str(out), *sizes]
        text, peak = _child(cmd)
        record = json.loads(text.strip().splitlines()[-1])
    for file in out.iterdir():
        file.unlink()
    return {**record, "peak": peak, "task": task}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, action="append", help="default: 131072 and 32768")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--cli", action="store_true", help="serfswap export on a saved folder")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--task", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    mode = "`serfswap export --convert` (a saved folder)" if args.cli else "`export_onnx`"
    print(f"{mode}; before: resident memory once the model is built")
    print("| task | weights (GB) | side file | before (GB) | peak RSS (GB) | peak / weights "
          "| export (s) |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for vocab in args.vocab or [131072, 32768]:
        with tempfile.TemporaryDirectory(dir=".") as folder:
            for task in TASKS:
                r = measure(args, vocab, task, Path(folder))
                side = "yes" if r.get("side_file", r["weights"] > 2**31) else "no"
                before = "-" if r["before"] is None else f"{r['before'] / 1e9:.2f}"
                print(f"| {task} | {r['weights'] / 1e9:.2f} | {side} | {before} "
                      f"| {r['peak'] / 1e9:.2f} | {r['peak'] / r['weights']:.2f} "
                      f"| {r['seconds']:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
