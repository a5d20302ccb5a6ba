"""Convert a timm model to Serf: plan, convert, read the report, check the outputs, revert.

    python examples/convert_timm.py                          # resnet18 at its 224x224 input
    python examples/convert_timm.py --model efficientnet_b0  # SiLU, fused BN+act, SE gates
    python examples/convert_timm.py --quick                  # small input, a few seconds

Weights are random here (``pretrained=False``: no download); with your own model, load its
trained weights first. The converted model is a copy: the original stays as it was, ready to be
the teacher of ``serfswap.recover`` (see recover_images.py).
"""

from __future__ import annotations

import argparse
from collections import Counter

import timm
import torch
import torch.nn.functional as F

import serfswap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", help="any timm model name")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="64x64 inputs, batch 2")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()

    # 1. The plan: what convert would change, changing nothing. Every activation site with its
    #    kind (module, norm-act, attribute, functional) and either "serf" or why it stays.
    plan = serfswap.plan(model)
    print(plan)

    # The same options narrow it down: glob patterns over module names (include= / exclude=),
    # a filter_fn(module, name), or activations= (families such as "relu", or "all").
    first = plan.converted[0].name
    narrowed = serfswap.plan(model, exclude=[first])
    print(f"\nwith exclude=[{first!r}]: {len(narrowed.converted)} of {len(plan.sites)} sites")

    # 2. Convert: a deep copy, so `model` is untouched. Always use the return value (a model
    #    that is itself an activation comes back as a new Serf module).
    serf_model = serfswap.convert(model)

    # 3. The report it carries is the plan, applied. Print it for the full table, or read it:
    report = serf_model.serfswap_report
    print("\n" + str(report).splitlines()[0])
    print("converted per original class:", dict(report.counts()))
    print("converted per kind of site:  ", dict(Counter(s.kind for s in report.converted)))
    for reason, n in Counter(s.reason for s in report.skipped).items():
        print(f"left alone: {n} x {reason}")
    assert report.applied and len(report.converted) == len(plan.converted)
    modules = dict(serf_model.named_modules())
    assert all(
        isinstance(modules[s.name], serfswap.Serf)
        for s in report.converted
        if s.kind in ("module", "norm-act")
    )

    # 4. Check the outputs. Same shapes and finite values; the values differ (Serf is not
    #    ReLU), which is what serfswap.recover() fixes with a short distillation.
    size = (3, 64, 64) if args.quick else model.pretrained_cfg["input_size"]
    x = torch.randn(2 if args.quick else args.batch, *size)
    with torch.no_grad():
        before, after = model(x), serf_model(x)
    assert after.shape == before.shape and torch.isfinite(after).all()
    cosine = F.cosine_similarity(before, after, dim=-1).mean().item()
    agree = (before.argmax(-1) == after.argmax(-1)).float().mean().item()
    gap = agree < 1 or cosine < 0.999
    print(
        f"\noutputs {tuple(after.shape)}: cosine to the original {cosine:.4f}, "
        f"top-1 agreement {agree:.0%} "
        + ("(recover() closes the gap)" if gap else "(no gap here: random weights change little)")
    )

    # Converting again is a no-op: the model already holds Serf and nothing else is left.
    again = serfswap.convert(serf_model, inplace=True)
    assert again is serf_model

    # 5. Revert: the original activation objects come back, and with them bit-identical outputs.
    original = serfswap.revert(serf_model)
    with torch.no_grad():
        assert torch.equal(original(x), before)
    assert not any(isinstance(m, serfswap.Serf) for m in original.modules())
    print("reverted: outputs bit-identical to the original model")


if __name__ == "__main__":
    main()
