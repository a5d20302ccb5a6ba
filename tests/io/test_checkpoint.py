"""serfswap checkpoints: ``save_checkpoint`` / ``load_checkpoint`` round trips (tied weights
included), files of the format written before ``save_model`` still loading, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import serfswap
from serfswap.io.architectures import describe
from serfswap.io.checkpoint import FORMAT, conversion_options
from tests.support.models import tiny_bert_config, tiny_resnet

timm = pytest.importorskip("timm", reason="timm is in the [timm] extra")
transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")
safetensors_torch = pytest.importorskip("safetensors.torch")


def tied_gpt2() -> nn.Module:
    """A tiny GPT-2 with its LM head tied to the token embeddings, converted to Serf."""
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=32,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    # eager attention, as the loader builds it: sdpa differs from it in the last bits
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model.eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    return serfswap.convert(model)


def converted_resnet() -> nn.Module:
    model = tiny_resnet(num_classes=5)
    return serfswap.convert(model, exclude="layer4.*").eval()


def write_previous_format(model: nn.Module, path: Path, arch: dict[str, object]) -> None:
    """What ``write_checkpoint`` wrote before ``save_checkpoint`` used ``save_model``: every
    name's tensor (save_file refused shared ones) and the same four metadata fields."""
    metadata = {
        "format": FORMAT,
        "serfswap_version": serfswap.__version__,
        "arch": json.dumps(arch),
        "swap": json.dumps(conversion_options(model)),
    }
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors_torch.save_file(state, str(path), metadata=metadata)


def header(path: Path) -> tuple[dict[str, object], bytes]:
    """A safetensors file's header, parsed, and the tensor bytes after it."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def test_tied_gpt2_round_trip_keeps_outputs_and_the_tie(tmp_path: Path) -> None:
    model = tied_gpt2()
    path = tmp_path / "gpt2.safetensors"
    serfswap.save_checkpoint(model, path)
    stored, _ = header(path)
    tensors = {k for k in stored if k != "__metadata__"}
    assert len(tensors & {"lm_head.weight", "transformer.wte.weight"}) == 1, "stored once"
    assert json.loads(stored["__metadata__"]["arch"])["head"] == "causal-lm"

    loaded = serfswap.load_checkpoint(path)
    assert type(loaded) is transformers.GPT2LMHeadModel
    assert loaded.lm_head.weight is loaded.transformer.wte.weight, "tied again after load"
    assert loaded.serfswap_report.converted == model.serfswap_report.converted
    ids = torch.randint(0, 97, (2, 11))
    torch.testing.assert_close(loaded.eval()(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_converted_timm_round_trip(tmp_path: Path) -> None:
    model = converted_resnet()
    path = tmp_path / "r.safetensors"
    serfswap.save_checkpoint(model, path, metadata={"note": "kept"})
    loaded = serfswap.load_checkpoint(path)
    assert isinstance(loaded.layer4[0].act1, nn.ReLU) and isinstance(loaded.act1, serfswap.Serf)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded.eval()(x), model(x), rtol=0, atol=0)
    assert header(path)[0]["__metadata__"]["note"] == "kept"
    assert oct(path.stat().st_mode & 0o777) != oct(0o600), "the usual permissions, not 0600"


def test_the_previous_format_loads_and_is_still_what_is_written(tmp_path: Path) -> None:
    model = converted_resnet()
    old, new = tmp_path / "old.safetensors", tmp_path / "new.safetensors"
    write_previous_format(model, old, describe(model))
    serfswap.save_checkpoint(model, new)
    assert header(new) == header(old), "same entries and the same tensor bytes"
    loaded = serfswap.load_checkpoint(old)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded.eval()(x), model(x), rtol=0, atol=0)
    assert serfswap.io.load_model(str(old)).arch == describe(model)


def test_a_previous_hf_checkpoint_with_serf_in_its_config_loads(tmp_path: Path) -> None:
    # describe() used to record the config after convert() wrote "serf" into it: rebuilt, such
    # a model has Serf already, and convert() found nothing to do (it raised a KeyError then).
    config = tiny_bert_config()
    bert = transformers.AutoModel.from_config(config, attn_implementation="eager")
    model = serfswap.convert(bert)
    assert model.config.hidden_act == "serf"
    path = tmp_path / "bert.safetensors"
    write_previous_format(model, path, {"kind": "hf", "config": model.config.to_dict()})
    loaded = serfswap.load_checkpoint(path)
    assert serfswap.io.describe(model)["config"]["hidden_act"] == "gelu", "now: the original"
    ids = torch.randint(0, 99, (2, 7))
    expected = model.eval()(ids).last_hidden_state
    torch.testing.assert_close(loaded.eval()(ids).last_hidden_state, expected, rtol=0, atol=0)


def test_refusals(tmp_path: Path) -> None:
    weights = tmp_path / "w.safetensors"
    safetensors_torch.save_file({"w": torch.zeros(2)}, str(weights))
    with pytest.raises(serfswap.ModelLoadError, match="without serfswap's metadata"):
        serfswap.load_checkpoint(weights)
    pickled = tmp_path / "m.pt"
    torch.save({"w": torch.zeros(2)}, pickled)
    with pytest.raises(serfswap.ModelLoadError, match="not a serfswap checkpoint"):
        serfswap.load_checkpoint(pickled)
    with pytest.raises(serfswap.InvalidArgumentError, match="cannot describe a Sequential"):
        serfswap.save_checkpoint(nn.Sequential(nn.Linear(2, 2)), tmp_path / "s.safetensors")
    with pytest.raises(serfswap.InvalidArgumentError, match="does not exist"):
        serfswap.save_checkpoint(converted_resnet(), tmp_path / "no" / "c.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "w.safetensors"]
