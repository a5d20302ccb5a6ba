"""`torchrun ... -m serfswap recover --fsdp`: a tiny LLaMA saved as a HuggingFace folder with
its tokenizer, recovered on a text file by two gloo processes, writes the same checkpoint as
the single-process command (within float summation order), one consolidated file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import serfswap
from tests.support.cli import ROOT, python
from tests.support.data import TEXT

transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")

# PYTHONFAULTHANDLER: a rank that aborts (once in a dozen runs on a loaded machine, a rank
# ended with SIGABRT, "terminate called without an active exception", after writing its
# file) prints every thread's Python stack, which says where it was.
ENV = {
    **os.environ,
    "PYTHONPATH": str(ROOT),
    "OMP_NUM_THREADS": "1",
    "TQDM_DISABLE": "1",
    "PYTHONFAULTHANDLER": "1",
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny LLaMA folder with a WordPiece tokenizer of the words of TEXT (written here, no
    download), and a text file of lines of eight words each: every line is as many tokens, so
    the batches have no padding and each rank's slice weighs the same in the mean loss."""
    root = tmp_path_factory.mktemp("llama")
    words = sorted({w.strip(".,").lower() for w in TEXT.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizerFast(
        str(root / "vocab.txt"), model_input_names=["input_ids", "attention_mask"]
    )
    tokenizer.save_pretrained(root)
    config = transformers.LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        initializer_range=0.2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root)
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(0, len(words), (8,), generator=g))
             for _ in range(16)]  # fmt: skip
    data = root.parent / "lines.txt"
    data.write_text("\n".join(lines) + "\n")
    return root, data


def recover(*args: str, torchrun: bool = False) -> str:
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = python(*(launch if torchrun else []), "-m", "serfswap", "recover", *args, env=ENV,
                  timeout=600)  # fmt: skip
    if proc.returncode != 0:
        pytest.fail(f"{args} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr}")
    return proc.stdout


@pytest.mark.slow  # two recover commands, one of them two processes: 20-30 s here
def test_torchrun_fsdp_recover_writes_the_single_process_checkpoint(
    llama: tuple[Path, Path], tmp_path: Path
) -> None:
    model, data = llama
    # A causal LM's text is packed: rows of 9 tokens are the lines (8 words and EOS), 12 rows
    # to train on, 3 global batches of 4 (2 a rank).
    common = ["--data", str(data), "--batch-size", "4", "--held-out", "0.25", "--steps", "4",
              "--lr", "1e-3", "--checkpoint-every", "2", "--max-length", "9"]  # fmt: skip
    single, sharded = tmp_path / "single.safetensors", tmp_path / "fsdp.safetensors"
    recover(str(model), "-o", str(single), *common)
    out = recover(str(model), "-o", str(sharded), *common, "--fsdp", torchrun=True)
    assert out.count(f"wrote {sharded}") == 1  # rank 0 writes the one file
    # The sharded checkpoints of steps 2 and 4 were written, then removed once OUT was.
    assert out.count("removed the run's 2 checkpoint(s)") == 1
    assert not (tmp_path / "fsdp.safetensors.checkpoints").exists()
    from safetensors.torch import load_file

    a, b = load_file(str(single)), load_file(str(sharded))
    teacher = transformers.LlamaForCausalLM.from_pretrained(model)
    moved = max((a[k] - v).abs().max().item() for k, v in teacher.state_dict().items())
    assert moved > 1e-3, "the runs must have trained for the comparison to mean anything"
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert (b[name] - value).abs().max().item() <= 1e-4 * value.abs().max().item(), name
    assert type(serfswap.load_checkpoint(sharded)).__name__ == "LlamaForCausalLM"
