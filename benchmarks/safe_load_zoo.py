"""How many real pickled models load without running code from the file (issue 11).

Pickles (``torch.save(model)``) every model of the test zoo — each timm ``test_*``
architecture, one model per timm family, every transformers type — unconverted and converted
to Serf, and loads each file the way ``serfswap`` loads a file it was not told to trust
(:func:`serfswap.safe_pickle.load`). Prints one line per refused file with the names it needed,
and the share that loaded. A loaded model is checked to be the same: equal state dicts.

    python benchmarks/safe_load_zoo.py [--timm-families] [--out DIR]

``--timm-families`` adds the ~80 per-family timm models (slow: several minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' zoo lists

import serfswap
from serfswap.io import safe_pickle
from tests.zoo import hf_zoo, timm_zoo


def models(families: bool) -> list[tuple[str, Callable[[], nn.Module]]]:
    import timm
    import transformers

    names = list(timm_zoo.TEST_MODELS) + (list(timm_zoo.FAMILIES.values()) if families else [])
    out: list[tuple[str, Callable[[], nn.Module]]] = [
        (f"timm:{name}", lambda name=name: timm.create_model(name, pretrained=False))
        for name in names
    ]
    for model_type in hf_zoo.MODELS:
        out.append((f"hf:{model_type}", lambda t=model_type: transformers.AutoModel.from_config(
            hf_zoo.config(t), attn_implementation="eager")))  # fmt: skip
    return out


class Unpicklable(Exception):
    """torch.save(model) itself fails (parametrized modules): no pickle to load."""


def check(model: nn.Module, path: Path) -> str | None:
    """None when ``path`` loads safely into an equal model, else what was refused."""
    try:
        torch.save(model, path)
    except Exception as exc:  # torch and pickle raise several kinds here
        raise Unpicklable(str(exc).splitlines()[0]) from None
    try:
        loaded = safe_pickle.load(path)
    except safe_pickle.UnsafePickleError as exc:
        return ", ".join(exc.names) or str(exc)
    want, got = model.state_dict(), loaded.state_dict()
    if want.keys() != got.keys() or any(not torch.equal(want[k], got[k]) for k in want):
        return "loaded, but the state dict differs"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timm-families", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    total = loaded = 0
    refused: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in models(args.timm_families):
            model = build().eval()
            variants = [("original", model)]
            with contextlib.suppress(serfswap.NothingToConvertError):  # no activation at all
                variants.append(("serf", serfswap.convert(model)))
            for variant, m in variants:
                try:
                    problem = check(m, Path(tmp) / "m.pt")
                except Unpicklable as exc:
                    print(f"skipped  {name} ({variant}): torch.save(model) fails: {exc}")
                    continue
                total += 1
                if problem is None:
                    loaded += 1
                else:
                    print(f"refused  {name} ({variant}): {problem}")
                    for part in problem.split(", "):
                        refused[part] = refused.get(part, 0) + 1
            del model, variants
    share = f"{loaded} of {total} ({loaded / total:.0%})"
    print(f"\n{share} pickled models loaded without running code, each equal to the original")
    for name, count in sorted(refused.items(), key=lambda kv: -kv[1]):
        print(f"  needed by {count}: {name}")


if __name__ == "__main__":
    main()
