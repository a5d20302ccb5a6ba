"""Recover a timm CNN after the swap to Serf, on a folder of images (one subfolder per class).

    python examples/recover_images.py --folder PATH --weights model.pth --model resnet50
    python examples/recover_images.py            # self-contained: digits written as PNG files
    python examples/recover_images.py --quick    # tiny model, few steps, a few seconds

The teacher is the original model, the student ``serfswap.convert(teacher)``; ``serfswap.recover``
fine-tunes the student towards the teacher (KL on logits, matching of the layers that hold a
converted activation, plus the task loss since ImageFolder batches carry labels) and reports
agreement, KL and accuracy on held-out images before and after.

Without ``--folder``, scikit-learn's digits (real 8x8 scans, bundled with it, no download) are
written as PNG files to a temporary folder. Without ``--weights``, the teacher is first trained
on the folder for ``--teacher-steps``: a stand-in for your trained model, so that its activations
matter and the swap costs accuracy the way it would on a real model.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import timm
import timm.data
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, random_split
from torchvision.datasets import ImageFolder

import serfswap


def write_digits(root: Path, per_class: int | None = None) -> Path:
    """scikit-learn's digits as PNG files in ``root/<digit>/<n>.png``: an ImageFolder layout."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts = [0] * 10
    for image, label in zip(digits.images, digits.target, strict=True):
        if per_class is not None and counts[label] >= per_class:
            continue
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image * (255 / 16)).round().astype(np.uint8)  # digits are 0..16 grey levels
        Image.fromarray(pixels, mode="L").save(folder / f"{counts[label]:04d}.png")
        counts[label] += 1
    return root


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    hits = total = 0
    for x, y in loader:
        hits += (model(x).argmax(-1) == y).sum().item()
        total += len(y)
    return hits / total


def train_teacher(model: nn.Module, loader: DataLoader, steps: int) -> None:
    """A short supervised training: stands in for the trained model you would start from."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    step = 0
    while step < steps:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == steps:
                break
    # After a few steps the BatchNorm running averages still lag the weights (a trained
    # model's have long caught up): without this the stand-in teacher would be worse in eval
    # mode than it is, and recovery, which re-estimates them for the student, would "beat" it.
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the pass
    with torch.no_grad():
        for x, _ in loader:
            model(x)
    for m in norms:
        m.momentum = 0.1
    model.eval()


def summarize(before: dict[str, float], after: dict[str, float], teacher: float) -> None:
    """The table in words. Agreement counts the held-out images on which student and teacher
    give the same answer, right or wrong, so it can fall while accuracy rises: the labels'
    task loss teaches the student where the teacher is wrong."""
    print(f"held-out accuracy: teacher {teacher:.1%}, converted {before['accuracy']:.1%}, "
          f"recovered {after['accuracy']:.1%}")  # fmt: skip
    print(f"same answer as the teacher: converted {before['agreement']:.1%}, "
          f"recovered {after['agreement']:.1%}")  # fmt: skip
    if after["agreement"] < before["agreement"] and after["accuracy"] > before["accuracy"]:
        print("  agreement fell while accuracy rose: agreement counts the same answer, right "
              "or wrong, and the labels (task loss) teach the student where the teacher is "
              "wrong")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, help="class subfolders of images")
    parser.add_argument("--model", default="resnet18", help="a timm model name")
    parser.add_argument("--weights", type=Path, help="a state dict of the trained teacher")
    parser.add_argument("--img-size", type=int, help="default: the model's (32 for digits)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200, help="recovery steps")
    parser.add_argument("--teacher-steps", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="tiny model, 20 images a class")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.steps, args.teacher_steps = "test_resnet", 5, 20
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder
        if folder is None:
            folder = write_digits(Path(tmp) / "digits", per_class=20 if args.quick else None)
            args.img_size = args.img_size or 32  # 8x8 scans: 224x224 would only cost time
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir())

        teacher = timm.create_model(args.model, pretrained=False, num_classes=len(classes))
        if args.weights is not None:
            teacher.load_state_dict(torch.load(args.weights, map_location="cpu"))

        # The model's own preprocessing (size, interpolation, crop, mean / std), from timm.
        overrides = {"input_size": (3, args.img_size, args.img_size)} if args.img_size else {}
        data_config = timm.data.resolve_data_config(overrides, model=teacher)
        transform = timm.data.create_transform(**data_config)  # evaluation transform
        dataset = ImageFolder(str(folder), transform=transform)  # grey PNGs are loaded as RGB
        held_out_size = max(len(dataset) // 5, 1)
        sizes = [len(dataset) - held_out_size, held_out_size]
        train_set, held_out_set = random_split(dataset, sizes, torch.Generator().manual_seed(0))
        print(f"{len(dataset)} images, {len(classes)} classes from {folder}; input {data_config}")

        # A seeded shuffle: the batches come in the same order on every run.
        shuffle = torch.Generator().manual_seed(0)
        train = DataLoader(train_set, batch_size=args.batch, shuffle=True, generator=shuffle)
        held_out = DataLoader(held_out_set, batch_size=100)
        if args.weights is None:
            train_teacher(teacher, train, args.teacher_steps)
        teacher.eval()
        print(f"teacher ({args.model}) held-out accuracy: {accuracy(teacher, held_out):.1%}")

        # The swap, then the recovery. The teacher is left as it was (mode and parameters);
        # the student is fine-tuned in place. Batches are (images, labels): the labels add the
        # task loss. An unlabelled loader of image tensors works too.
        student = serfswap.convert(teacher)
        print(str(student.serfswap_report).splitlines()[0])
        result = serfswap.recover(
            student, teacher, train, steps=args.steps, eval_data=held_out, progress=not args.quick
        )
        print(result)
        summarize(result.before, result.after, accuracy(teacher, held_out))

    # The recovered student is an ordinary module: save its weights (load them into
    # serfswap.convert(timm.create_model(...))), export it (export_onnx_serve.py) or keep training.
    assert all(np.isfinite(r["loss"]) for r in result.history)


if __name__ == "__main__":
    main()
