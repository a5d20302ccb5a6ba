"""Write the golden pickles: converted models saved whole by ``torch.save`` with the code of
the day, and their outputs, so that a later layout can prove it still loads them.

Written once (before the #25 move, with serfswap 0.1.0 at 01a04fc) and committed; run again
only to add a new case, never to refresh an old one: ``python -m tests.golden.make_golden``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import transformers
from torch import nn

import serfswap
from tests.golden.models import AttributeFn, FunctionalFn

HERE = Path(__file__).parent
TEXT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=48)  # fmt: skip
MAMBA = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, state_size=4, expand=2,
             conv_kernel=4, time_step_rank=4)  # fmt: skip


def _ids() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(3, 99, (2, 8), generator=torch.Generator().manual_seed(1))}


def _image(size: int) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))}


def _hf(config: transformers.PretrainedConfig, cls: type = transformers.AutoModel) -> nn.Module:
    return cls.from_config(config).eval()


# name -> (model builder, inputs, convert kwargs)
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], dict], dict]] = {
    # timm: module sites (ReLU, Hardswish) and norm-act sites (BatchNormAct2d)
    "timm_mobilenetv3": (
        lambda: timm.create_model("mobilenetv3_small_050", num_classes=4).eval(),
        lambda: _image(64),
        {},
    ),
    "attribute": (AttributeFn, lambda: {"x": torch.randn(2, 8)}, {}),
    "functional": (FunctionalFn, lambda: {"x": torch.randn(2, 8)}, {}),
    "hf_bert": (lambda: _hf(transformers.BertConfig(**TEXT)), _ids, {}),
    "hf_llama": (
        lambda: _hf(
            transformers.LlamaConfig(**TEXT, num_key_value_heads=1),
            transformers.AutoModelForCausalLM,
        ),
        _ids,
        {},
    ),
    # a run-time site (mamba_selective_scan's F.silu(z)) and string sites
    "hf_mamba": (lambda: _hf(transformers.MambaConfig(**MAMBA)), _ids, {}),
}


def _output(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def main(names: list[str]) -> None:
    for name in names or list(CASES):
        build, inputs_of, kwargs = CASES[name]
        torch.manual_seed(0)
        model = build()
        inputs = inputs_of()
        converted = serfswap.convert(model, example_inputs=inputs, **kwargs)
        kinds = sorted({s.kind for s in converted.serfswap_report.sites})
        torch.save(converted, HERE / f"{name}.pt")
        torch.save({"inputs": inputs, "output": _output(converted, inputs), "kinds": kinds},
                   HERE / f"{name}.expected.pt")  # fmt: skip
        size = (HERE / f"{name}.pt").stat().st_size
        print(f"{name}: {size / 1e6:.2f} MB, site kinds {kinds}")


if __name__ == "__main__":
    main(sys.argv[1:])
