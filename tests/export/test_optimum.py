"""Optimum's ONNX exporter on Serf models: the compatibility job (``.ci/run``, ``.venv-compat``).

optimum-onnx's newest release pins transformers 4.57, so these tests run in a second virtual
environment of their own (``pip install -e ".[compat]"``, ``pytest -m compat``) and skip where
Optimum is not installed. A converted model is saved with ``save_pretrained`` (its config says
"serf"), exported with ``main_export`` exactly as an original model is, and run with
onnxruntime through Optimum's own model classes.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

import serfswap

pytestmark = pytest.mark.compat

optimum_onnx = pytest.importorskip(
    "optimum.exporters.onnx", reason="optimum-onnx runs in the compat job (.venv-compat)"
)
ort_models = pytest.importorskip("optimum.onnxruntime")
transformers = pytest.importorskip("transformers")

TEXT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=37, max_position_embeddings=64)  # fmt: skip
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=1,
        eos_token_id=2,
    ),
    "llama": lambda: transformers.LlamaConfig(
        **TEXT, num_key_value_heads=1, hidden_act="silu", bos_token_id=1, eos_token_id=2
    ),
    "bert": lambda: transformers.BertConfig(**TEXT),
}  # fmt: skip


def _save_serf_model(kind: str, auto: type, directory: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    model = serfswap.convert(auto.from_config(CONFIGS[kind]())).eval()
    assert model.config.to_dict()["serfswap"]  # convert wrote "serf" into the config
    model.save_pretrained(directory)
    return model


def _check_onnx(directory: Path) -> None:
    """Serf as standard ops only: Softplus, Erf, Mul (Optimum uses the TorchScript exporter)."""
    path = directory / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Softplus") == 2, ops  # one Serf per layer, two layers


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_main_export_text_generation_with_past_generates_the_same_tokens(
    kind: str, tmp_path: Path
) -> None:
    model = _save_serf_model(kind, transformers.AutoModelForCausalLM, tmp_path / "torch")
    optimum_onnx.main_export(
        str(tmp_path / "torch"), output=tmp_path / "onnx", task="text-generation-with-past",
        device="cpu",
    )  # fmt: skip
    _check_onnx(tmp_path / "onnx")
    ort_model = ort_models.ORTModelForCausalLM.from_pretrained(tmp_path / "onnx", use_cache=True)
    prompt = torch.tensor([[1, 17, 42, 5, 63], [1, 9, 9, 31, 77]])
    settings = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(prompt, attention_mask=torch.ones_like(prompt), **settings)
    got = ort_model.generate(prompt, attention_mask=torch.ones_like(prompt), **settings)
    assert want.shape == (2, 5 + 16)
    assert torch.equal(got, want)


def test_main_export_feature_extraction_bert_matches_torch(tmp_path: Path) -> None:
    model = _save_serf_model("bert", transformers.AutoModel, tmp_path / "torch")
    optimum_onnx.main_export(
        str(tmp_path / "torch"), output=tmp_path / "onnx", task="feature-extraction", device="cpu"
    )
    _check_onnx(tmp_path / "onnx")
    ort_model = ort_models.ORTModelForFeatureExtraction.from_pretrained(tmp_path / "onnx")
    ids = torch.randint(3, 99, (3, 11))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "token_type_ids": torch.zeros_like(ids)}  # fmt: skip
    with torch.no_grad():
        want = model(**batch).last_hidden_state
    got = ort_model(**batch).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_optimum_loads_serfswaps_seq2seq_folder_and_generates_torchs_tokens(
    tmp_path: Path,
) -> None:
    """serfswap's own seq2seq export (transformers 4's cache API here), loaded by Optimum's
    ORTModelForSeq2SeqLM as it loads its own: with the cache (decoder_with_past_model.onnx)
    and the same greedy tokens as torch, for a padded batch of two."""
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    model = transformers.AutoModelForSeq2SeqLM.from_config(config)
    with torch.no_grad():  # wider than T5's initialiser: tokens that vary from step to step
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.3)
    model = serfswap.convert(model).eval()
    report = serfswap.export_onnx(model, tmp_path / "onnx", task="text2text-generation-with-past")
    assert report.verified and report.serf_nodes == 6  # one per layer's FFN, in each file
    ort_model = ort_models.ORTModelForSeq2SeqLM.from_pretrained(tmp_path / "onnx", use_cache=True)
    assert ort_model.decoder_with_past is not None and ort_model.can_use_cache
    ids = torch.tensor([[5, 17, 42, 8, 9, 33, 12], [11, 3, 64, 27, 50, 4, 4]])
    mask = (torch.arange(7) < torch.tensor([[7], [4]])).long()
    settings = dict(max_new_tokens=12, do_sample=False)
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, **settings)
    got = ort_model.generate(input_ids=ids, attention_mask=mask, **settings)
    assert want.shape == (2, 13) and len(set(want[:, 1:].ravel().tolist())) > 2
    assert torch.equal(got, want)


def test_optimum_loads_serfswaps_whisper_folder_and_generates_torchs_tokens(
    tmp_path: Path,
) -> None:
    """The speech task's folder, loaded by ORTModelForSpeechSeq2Seq (Optimum's Whisper class):
    the same logits as torch for a decoder prefix, and the same greedy tokens (the plain greedy
    loop, GenerationMixin's: Whisper's own generate wants a real tokenizer's special ids)."""
    torch.manual_seed(0)
    config = transformers.WhisperConfig(
        vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
        decoder_ffn_dim=48, num_mel_bins=8, max_source_positions=16, max_target_positions=64,
        decoder_start_token_id=1, pad_token_id=0, eos_token_id=2, bos_token_id=1,
        begin_suppress_tokens=None, suppress_tokens=None,
    )  # fmt: skip
    model = transformers.AutoModelForSpeechSeq2Seq.from_config(config)
    with torch.no_grad():  # wider than Whisper's initialiser: tokens that vary
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1 and "embed_positions" not in name:
                parameter.normal_(0.0, 1.0)
    model = serfswap.convert(model).eval()
    task = "automatic-speech-recognition-with-past"
    assert serfswap.export_onnx(model, tmp_path / "onnx", task=task).verified
    ort_model = ort_models.ORTModelForSpeechSeq2Seq.from_pretrained(tmp_path / "onnx")
    assert ort_model.can_use_cache
    features = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1))
    prefix = torch.tensor([[1, 5, 9], [1, 7, 3]])
    with torch.no_grad():
        want = model(input_features=features, decoder_input_ids=prefix).logits
        tokens = transformers.GenerationMixin.generate(
            model, input_features=features, max_new_tokens=8, do_sample=False
        )
    got = ort_model(input_features=features, decoder_input_ids=prefix).logits
    # fp32's rounding grows with the logits (up to about 20 at these weights)
    scale = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got, want, atol=1e-4 * scale, rtol=1e-4)
    generated = transformers.GenerationMixin.generate(
        ort_model, input_features=features, max_new_tokens=8, do_sample=False
    )
    assert len(set(tokens[:, 1:].ravel().tolist())) > 2
    assert torch.equal(generated, tokens)
