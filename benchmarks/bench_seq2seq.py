"""Greedy seq2seq generation per new token (``bench_generate.py --seq2seq``): the KV-cache
folder against recomputing the decoder and torch, on a small Serf T5.

A 4 + 4-layer T5 (d_model 256, 8 heads, gated-GELU FFN 1024 -> Serf, vocab 1000) is exported
twice: ``task="text2text-generation-with-past"`` (Optimum's three files) and the default (one
graph: encoder and decoder run whole at every step). From a 32-token input and a decoder prefix
of each length, the milliseconds per new token of

* ``onnx-cache``: ``serfswap.runtime.generate_seq2seq`` on the folder,
* ``onnx-recompute``: the same greedy loop on the one-graph file,
* ``torch``: the torch model's ``generate(do_sample=False)`` (eager attention, with its cache),

each as (time for 1 + N new tokens - time for 1 new token) / N, so the prefix's first pass is
not counted; median over runs, the three interleaved run by run; the three must make the same
tokens. CPU, 2 threads everywhere.

    python benchmarks/bench_generate.py --seq2seq                 # decoder lengths 16, 64, 256
    python benchmarks/bench_generate.py --seq2seq --contexts 16 --runs 3 --new-tokens 8
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import transformers

import serfswap
from serfswap.onnx_ops import session
from serfswap.runtime.seq2seq import generate_seq2seq, load

THREADS = 2
VOCAB = 1000
SOURCE = 32  # the encoder's input length


def build_t5() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=256, d_kv=32, d_ff=1024, num_layers=4, num_heads=8,
        feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1,
    )  # fmt: skip
    model = transformers.AutoModelForSeq2SeqLM.from_config(config, attn_implementation="eager")
    model = serfswap.convert(model).eval()
    model.generation_config.eos_token_id = None  # every run makes all its tokens
    return model


def recompute_generate(sess, ids: np.ndarray, prefix: np.ndarray, new_tokens: int) -> np.ndarray:
    """Greedy generation with the one-graph file: encoder and whole decoder at every step."""
    mask = np.ones_like(ids)
    tokens = prefix
    for _ in range(new_tokens):
        (logits,) = sess.run(["logits"], {"input_ids": ids, "attention_mask": mask,
                                          "decoder_input_ids": tokens})  # fmt: skip
        tokens = np.concatenate([tokens, logits[:, -1:, :].argmax(-1)], axis=1)
    return tokens


def run(args: argparse.Namespace, per_token_ms: Callable[..., float]) -> None:
    """The table, with ``bench_generate.per_token_ms`` as the clock."""
    torch.set_num_threads(THREADS)
    model = build_t5()
    folder = Path(tempfile.mkdtemp(prefix="bench-seq2seq-"))
    task = "text2text-generation-with-past"
    serfswap.export_onnx(model, folder / "cache", task=task)
    serfswap.export_onnx(model, folder / "plain.onnx")
    cached = load(folder / "cache", threads=THREADS)
    plain = session(folder / "plain.onnx", "cpu", threads=THREADS)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {THREADS} "
          f"threads, T5 4+4 layers d_model 256, input {SOURCE} tokens, {args.new_tokens} new "
          f"tokens, median of {args.runs} runs")  # fmt: skip
    print(f"{'decoder length':>14} {'onnx-cache':>11} {'onnx-recompute':>15} {'torch':>8}"
          f" {'recompute/cache':>16} {'torch/cache':>12}")  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (1, SOURCE), generator=generator)
    rows = {}
    for length in args.contexts:
        prefix = torch.randint(3, VOCAB, (1, length), generator=generator)
        prefix[0, 0] = 0  # the decoder's start token
        np_ids, np_prefix = ids.numpy(), prefix.numpy()
        runners = {
            "onnx-cache": lambda n, p=np_prefix, i=np_ids: generate_seq2seq(
                cached, i, max_new_tokens=n, decoder_input_ids=p, eos_token_id=[]
            ),
            "onnx-recompute": lambda n, p=np_prefix, i=np_ids: recompute_generate(plain, i, p, n),
            "torch": lambda n, p=prefix: model.generate(
                input_ids=ids, decoder_input_ids=p, max_new_tokens=n, min_new_tokens=n,
                do_sample=False,
            ),
        }  # fmt: skip
        with torch.no_grad():
            outs = [np.asarray(r(4)) for r in runners.values()]
            assert all(np.array_equal(outs[0], o) for o in outs[1:]), "the three disagree"
            times: dict[str, list[float]] = {name: [] for name in runners}
            for _ in range(args.runs):
                for name, runner in runners.items():
                    times[name].append(per_token_ms(runner, args.new_tokens))
        ms = {name: statistics.median(t) for name, t in times.items()}
        rows[length] = ms
        print(f"{length:>14} {ms['onnx-cache']:>9.2f}ms {ms['onnx-recompute']:>13.2f}ms "
              f"{ms['torch']:>6.2f}ms {ms['onnx-recompute'] / ms['onnx-cache']:>15.1f}x "
              f"{ms['torch'] / ms['onnx-cache']:>11.2f}x")  # fmt: skip
    first, last = min(rows), max(rows)
    print(f"cache per-token growth {first} -> {last}: "
          f"{rows[last]['onnx-cache'] / rows[first]['onnx-cache']:.2f}x")  # fmt: skip
