"""Greedy generation per new token: the KV-cache export against recomputing the prefix and torch.

A 4-layer LLaMA-style Serf model (hidden 256, GQA 8/4 heads, vocab 1000) is exported twice:
``task="text-generation-with-past"`` and the default (no cache: every step runs the whole
sequence). At each context length, the milliseconds per new token of

* ``onnx-cache``: ``serfswap.onnx_ops.generate`` on the KV-cache file,
* ``onnx-recompute``: the same greedy loop on the no-cache file,
* ``torch``: the torch model's ``generate(do_sample=False)`` (eager, with its cache),

each as (time for 1 + N new tokens - time for 1 new token) / N, so the prompt's first pass is
not counted; median over runs, the three interleaved run by run. CPU, 2 threads everywhere.

    python benchmarks/bench_generate.py                     # contexts 32, 128, 512
    python benchmarks/bench_generate.py --contexts 32 512 --runs 3 --new-tokens 8
    python benchmarks/bench_generate.py --opset23   # also the KV-cache file at opset 23

``--opset23``: also ``onnx-cache-23``, the KV-cache file exported at opset 23 (attention as
ONNX's standard ``Attention`` op), interleaved with the others, with its ratio to ``onnx-cache``.

``--seq2seq``: the same for an encoder-decoder (a small T5) at decoder lengths 16, 64, 256;
see ``bench_seq2seq.py``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import transformers

import serfswap
from serfswap.onnx_ops import generate, session

THREADS = 2
VOCAB = 1000


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
    )  # fmt: skip
    model = serfswap.convert(transformers.AutoModelForCausalLM.from_config(config)).eval()
    model.generation_config.eos_token_id = None  # every run makes all its tokens
    return model


def recompute_generate(sess, tokens: np.ndarray, new_tokens: int) -> np.ndarray:
    """Greedy generation with the no-cache file: the whole sequence at every step."""
    for _ in range(new_tokens):
        mask = np.ones_like(tokens)
        (logits,) = sess.run(["logits"], {"input_ids": tokens, "attention_mask": mask})
        tokens = np.concatenate([tokens, logits[:, -1:, :].argmax(-1)], axis=1)
    return tokens


def per_token_ms(run: Callable[[int], object], new_tokens: int) -> float:
    """Milliseconds per new token beyond the first (the first pays for the prompt)."""
    start = time.perf_counter()
    run(1)
    one = time.perf_counter() - start
    start = time.perf_counter()
    run(1 + new_tokens)
    return 1000 * (time.perf_counter() - start - one) / new_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seq2seq", action="store_true", help="a small T5 (bench_seq2seq.py)")
    parser.add_argument("--opset23", action="store_true", help="also the cache file at opset 23")
    args = parser.parse_args()
    if args.seq2seq:
        import bench_seq2seq  # beside this file: the script's folder is on sys.path

        args.contexts = args.contexts or [16, 64, 256]
        bench_seq2seq.run(args, per_token_ms)
        return
    args.contexts = args.contexts or [32, 128, 512]
    torch.set_num_threads(THREADS)
    model = build_model()
    folder = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    serfswap.export_onnx(model, folder / "cache.onnx", task="text-generation-with-past")
    serfswap.export_onnx(model, folder / "plain.onnx")
    cached = session(folder / "cache.onnx", "cpu", threads=THREADS)
    cached23 = None
    if args.opset23:
        serfswap.export_onnx(model, folder / "cache23.onnx", task="text-generation-with-past",
                             opset=23)  # fmt: skip
        cached23 = session(folder / "cache23.onnx", "cpu", threads=THREADS)
    plain = session(folder / "plain.onnx", "cpu", threads=THREADS)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {THREADS} "
          f"threads, {args.new_tokens} new tokens, median of {args.runs} runs")  # fmt: skip
    print(f"{'context':>8} {'onnx-cache':>11} {'onnx-recompute':>15} {'torch':>8}"
          f" {'recompute/cache':>16} {'torch/cache':>12}")  # fmt: skip
    rows = {}
    for context in args.contexts:
        prompt = torch.randint(3, VOCAB, (1, context), generator=torch.Generator().manual_seed(1))
        ids = prompt.numpy()
        runners = {
            "onnx-cache": lambda n, ids=ids: generate(cached, ids, max_new_tokens=n),
            "onnx-recompute": lambda n, ids=ids: recompute_generate(plain, ids, n),
            "torch": lambda n, prompt=prompt: model.generate(
                prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
            ),
        }
        if cached23 is not None:
            runners["onnx-cache-23"] = lambda n, ids=ids: generate(cached23, ids, max_new_tokens=n)
        # the same tokens from all, or the timings compare different work
        outs = [np.asarray(r(4)) for r in runners.values()]
        assert all(np.array_equal(outs[0], o) for o in outs[1:]), "the three disagree"
        times: dict[str, list[float]] = {name: [] for name in runners}
        with torch.no_grad():
            for _ in range(args.runs):
                for name, run in runners.items():
                    times[name].append(per_token_ms(run, args.new_tokens))
        ms = {name: statistics.median(t) for name, t in times.items()}
        rows[context] = ms
        print(f"{context:>8} {ms['onnx-cache']:>9.2f}ms {ms['onnx-recompute']:>13.2f}ms "
              f"{ms['torch']:>6.2f}ms {ms['onnx-recompute'] / ms['onnx-cache']:>15.1f}x "
              f"{ms['torch'] / ms['onnx-cache']:>11.2f}x")  # fmt: skip
        if cached23 is not None:
            print(f"{'':>8} onnx-cache-23 {ms['onnx-cache-23']:.2f}ms, "
                  f"{ms['onnx-cache-23'] / ms['onnx-cache']:.2f}x onnx-cache")  # fmt: skip
    first, last = min(rows), max(rows)
    print(f"cache per-token growth {first} -> {last}: "
          f"{rows[last]['onnx-cache'] / rows[first]['onnx-cache']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
