"""The seq2seq tasks (``text2text-generation-with-past``,
``automatic-speech-recognition-with-past``) and greedy generation on onnxruntime with the folder
they write.

Six encoder-decoders from small configs (2 + 2 layers, d_model 32, vocab 100), converted to Serf,
exported as Optimum's three files, and generated from on onnxruntime: the tokens must be exactly
those of the torch model's ``generate(do_sample=False)`` for a batch of two inputs of different
lengths (padding), and the logits of every step (the cache at every past length) those of torch
run on the same decoder prefix without a cache. A random model may repeat one token forever,
where a wrong cache goes unseen in the tokens; the logits catch it. The weights are drawn wider
than the configs' initialisers so that the tokens vary (``WIDTH``). T5 runs in the main job
(about a minute of export on 2 cores); the other five are ``slow``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

import serfswap
from serfswap.cli.main import main
from serfswap.errors import TaskError
from serfswap.onnx_ops import check_graph
from serfswap.runtime import generate
from serfswap.runtime.seq2seq import generate_seq2seq, load
from tests.runtime.test_generate import save_tokenizer

transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")

NEW_TOKENS = 12
BART_LIKE = dict(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2,
                 encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                 decoder_ffn_dim=48, max_position_embeddings=64)  # fmt: skip
CONFIGS: dict[str, Callable[[], Any]] = {
    "t5": lambda: transformers.T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    ),
    "bart": lambda: transformers.BartConfig(**BART_LIKE),  # forced_eos_token_id=2
    "marian": lambda: transformers.MarianConfig(
        **BART_LIKE, pad_token_id=3, eos_token_id=2, decoder_start_token_id=3,
        forced_eos_token_id=2,
    ),
    "pegasus": lambda: transformers.PegasusConfig(**BART_LIKE),
    "mbart": lambda: transformers.MBartConfig(**BART_LIKE),
    "whisper": lambda: transformers.WhisperConfig(
        **{k: v for k, v in BART_LIKE.items() if k != "max_position_embeddings"},
        num_mel_bins=8, max_source_positions=16, max_target_positions=64,
        decoder_start_token_id=1, pad_token_id=0, eos_token_id=2, bos_token_id=1,
        begin_suppress_tokens=[5, 7], suppress_tokens=[9],
    ),
}  # fmt: skip
# the weights' standard deviation at which each model's greedy tokens vary (measured: at the
# configs' own 0.02 most repeat one token, T5 at 1.0 too)
WIDTH = {"t5": 0.3, "bart": 1.0, "marian": 0.02, "pegasus": 1.0, "mbart": 1.0, "whisper": 1.0}
AUTO = {"whisper": "AutoModelForSpeechSeq2Seq"}
TASK = {"whisper": "automatic-speech-recognition-with-past"}
MAIN_JOB = ("t5",)
# two inputs of different lengths: the second is padded (0 in the mask)
IDS = torch.tensor([[5, 17, 42, 8, 9, 33, 12], [11, 3, 64, 27, 50, 4, 4]])
MASK = (torch.arange(7) < torch.tensor([[7], [4]])).long()


def serf_seq2seq(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    auto = getattr(transformers, AUTO.get(kind, "AutoModelForSeq2SeqLM"))
    model = auto.from_config(CONFIGS[kind]())
    with torch.no_grad():  # wider than the initialisers: tokens that vary from step to step
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1 and "embed_positions" not in name:
                parameter.normal_(0.0, WIDTH[kind])
    return serfswap.convert(model).eval()


def encoder_inputs(kind: str) -> dict[str, torch.Tensor]:
    if kind == "whisper":
        config = CONFIGS[kind]()
        features = torch.randn(2, config.num_mel_bins, 2 * config.max_source_positions,
                               generator=torch.Generator().manual_seed(1))  # fmt: skip
        return {"input_features": features}
    return {"input_ids": IDS, "attention_mask": MASK}


def torch_generate(model: torch.nn.Module, kind: str) -> np.ndarray:
    """torch's greedy tokens. Whisper's own generate adds language, task and timestamp logic
    (its generation config needs the real tokenizer's ids): the plain greedy loop is
    GenerationMixin's, with the same token rules (suppress, begin-suppress)."""
    settings = dict(max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1)
    with torch.no_grad():
        if kind == "whisper":
            out = transformers.GenerationMixin.generate(model, **encoder_inputs(kind), **settings)
        else:
            out = model.generate(**encoder_inputs(kind), **settings)
    return out.numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Any, Path]]:
    """One export per architecture, shared by the tests of this module. T5's goes through the
    command line, from a saved folder with a tokenizer (which export copies into the folder),
    the others through the API."""
    done: dict[str, tuple[Any, Path]] = {}

    def get(kind: str) -> tuple[Any, Path]:
        if kind not in done:
            model = serf_seq2seq(kind)
            place = tmp_path_factory.mktemp(kind)
            folder = place / "onnx"
            if kind == "t5":
                model.save_pretrained(place / "torch")
                save_tokenizer(place / "torch")
                argv = ["export", str(place / "torch"), str(folder), "--task", TEXT2TEXT]
                assert main(argv) == 0
            else:
                report = serfswap.export_onnx(model, folder, task=TASK.get(kind, TEXT2TEXT))
                assert report.verified and report.serf_nodes > 0
            done[kind] = model, folder
        return done[kind]

    return get


TEXT2TEXT = "text2text-generation-with-past"
KINDS = [k if k in MAIN_JOB else pytest.param(k, marks=pytest.mark.slow) for k in CONFIGS]


def check_folder(folder: Path, kind: str) -> None:
    """Optimum's files, names and axes; the exact Serf pattern in every file, none left."""
    files = {p.name for p in folder.iterdir()} - {"tokenizer.json", "tokenizer_config.json"}
    assert files == {"encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx",
                     "config.json", "generation_config.json"}  # fmt: skip
    layers = 2
    decoder_past = [f"{i}.decoder.{kv}" for i in range(layers) for kv in ("key", "value")]
    encoder_past = [f"{i}.encoder.{kv}" for i in range(layers) for kv in ("key", "value")]
    speech = kind == "whisper"
    for name in ("encoder_model", "decoder_model", "decoder_with_past_model"):
        proto = onnx.load(str(folder / f"{name}.onnx"))
        graph = check_graph(proto)
        # one Serf per layer's FFN; Whisper's encoder has two more (its convolutions' GELU)
        serfs = 4 if speech and name == "encoder_model" else 2
        assert graph.serf_total == serfs and not graph.leftovers and not graph.custom_domains
        inputs = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                  for v in proto.graph.input}  # fmt: skip
        outputs = [v.name for v in proto.graph.output]
        if name == "encoder_model":
            assert list(inputs) == (
                ["input_features"] if speech else ["input_ids", "attention_mask"]
            )
            assert outputs == ["last_hidden_state"]
            assert inputs[next(iter(inputs))][0] == "batch"
            continue
        want = ["input_ids"] + ([] if speech else ["encoder_attention_mask"])
        want.append("encoder_hidden_states")
        pairs = [decoder_past[2 * i : 2 * i + 2] + encoder_past[2 * i : 2 * i + 2]
                 for i in range(layers)]  # fmt: skip
        presents = ["present." + p for pair in pairs for p in pair]
        if name == "decoder_with_past_model":
            want += ["past_key_values." + p.removeprefix("present.") for p in presents]
            presents = [p for p in presents if ".decoder." in p]
            past = inputs["past_key_values.0.decoder.key"]
            assert past[0] == "batch" and past[2] == "past_sequence"
            assert inputs["past_key_values.1.encoder.value"][2] == "encoder_sequence"
        assert list(inputs) == want
        assert outputs == ["logits", *presents]
        assert inputs["input_ids"] == ["batch", "sequence"]
        assert inputs["encoder_hidden_states"][:2] == ["batch", "encoder_sequence"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == kind


@pytest.mark.parametrize("kind", KINDS)
def test_seq2seq_generates_torchs_tokens(kind: str, exported: Callable[[str], Any]) -> None:
    model, folder = exported(kind)
    check_folder(folder, kind)
    want = torch_generate(model, kind)
    inputs = list(encoder_inputs(kind).values())
    got = generate(folder, *inputs, max_new_tokens=NEW_TOKENS)
    assert want.shape[0] == 2 and want.shape[1] > 2
    assert len(set(want[:, 1:].ravel().tolist())) > 2, "the tokens should vary"
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_seq2seq_step_logits_match_torch(kind: str, exported: Callable[[str], Any]) -> None:
    """The decoder fed torch's tokens one at a time through the cache: at every step, the
    logits equal torch's for the same prefix, computed without a cache."""
    model, folder = exported(kind)
    tokens = torch.from_numpy(torch_generate(model, kind))
    inputs = encoder_inputs(kind)
    with torch.no_grad():
        want = model(**inputs, decoder_input_ids=tokens, use_cache=False).logits.numpy()
    sessions = load(folder)
    encoded = {"encoder_hidden_states": None}
    hidden = sessions.encoder.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    encoded["encoder_hidden_states"] = hidden
    if "attention_mask" in inputs:
        encoded["encoder_attention_mask"] = inputs["attention_mask"].numpy()
    feed = {**encoded, "input_ids": tokens[:, :1].numpy()}
    sess, steps = sessions.decoder, []
    for position in range(tokens.shape[1]):
        names = [o.name for o in sess.get_outputs()]
        wanted = {i.name for i in sess.get_inputs()}
        results = dict(zip(names, sess.run(None, {k: v for k, v in feed.items() if k in wanted}),
                           strict=True))  # fmt: skip
        steps.append(results["logits"][:, -1])
        for name, value in results.items():
            if name.startswith("present."):
                feed["past_key_values." + name.removeprefix("present.")] = value
        feed["input_ids"] = tokens[:, position + 1 : position + 2].numpy()
        sess = sessions.with_past
    # fp32's rounding grows with the logits: torch itself differs by 1.5e-4 between BART's
    # logits (up to 17) at prefix lengths 1 and 13, where a wrong cache is off by units
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(np.stack(steps, axis=1), want, atol=1e-4 * scale, rtol=1e-4)


def test_seq2seq_stops_at_eos_and_pads(exported: Callable[[str], Any]) -> None:
    """A row that produces eos is continued with the pad id, and generation stops when every
    row has: the eos is the token torch produces at step 3 of row 0."""
    model, folder = exported("t5")
    free = generate_seq2seq(folder, IDS, MASK, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    eos = int(free[0, 3])
    with torch.no_grad():
        out = model.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=NEW_TOKENS,
                             do_sample=False, eos_token_id=eos, pad_token_id=99)  # fmt: skip
    want = out.numpy()
    got = generate_seq2seq(folder, IDS, MASK, max_new_tokens=NEW_TOKENS, eos_token_id=eos,
                           pad_token_id=99)  # fmt: skip
    np.testing.assert_array_equal(got, want)
    assert got[0, 3] == eos and got.shape[1] <= free.shape[1]


@pytest.mark.parametrize(
    ("make", "task", "says"),
    [
        (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=100, n_embd=32, n_layer=1, n_head=2)), TEXT2TEXT,
         "got gpt2 (GPT2LMHeadModel): a decoder-only model exports with --task "
         "text-generation-with-past"),
        (lambda: transformers.BertModel(transformers.BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=37)), TEXT2TEXT, "got bert (BertModel)"),
        (lambda: serf_seq2seq("t5"), "text-generation-with-past",
         "got t5 (T5ForConditionalGeneration): an encoder-decoder exports with --task "
         "text2text-generation-with-past"),
        (lambda: serf_seq2seq("t5"), "automatic-speech-recognition-with-past",
         "does not fit t5 (T5ForConditionalGeneration), whose encoder takes input_ids: use "
         "--task text2text-generation-with-past"),
    ],
)  # fmt: skip
def test_wrong_model_for_the_task_writes_nothing(
    make: Callable[[], torch.nn.Module], task: str, says: str, tmp_path: Path
) -> None:
    with pytest.raises(TaskError, match="task '" + task) as caught:
        serfswap.export_onnx(make(), tmp_path / "out", task=task)
    assert says in str(caught.value) and "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_the_command_line_generates_from_the_folder(
    exported: Callable[[str], Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """``serfswap generate OUTDIR TEXT...``: the tokenizer that export copied into the folder,
    a padded batch, torch's tokens decoded."""
    model, folder = exported("t5")
    assert (folder / "tokenizer.json").is_file()
    capsys.readouterr()
    texts = ["w5 w17 w42 w8 w9 w33 w12", "w11 w3 w64 w27"]
    assert main(["generate", str(folder), "--max-new-tokens", str(NEW_TOKENS), *texts]) == 0
    printed = capsys.readouterr().out.splitlines()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    assert batch["attention_mask"].sum(1).tolist() == [7, 4]  # padded, as IDS and MASK
    with torch.no_grad():
        tokens = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert printed == tokenizer.batch_decode(tokens, skip_special_tokens=True)
    assert all(line.strip() for line in printed)


def write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    import wave

    with wave.open(str(path), "wb") as audio:
        audio.setnchannels(1)
        audio.setsampwidth(2)
        audio.setframerate(rate)
        audio.writeframes(np.round(np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


@pytest.mark.slow
def test_the_command_line_transcribes_wav_files_with_whisper(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``serfswap export DIR OUT --task automatic-speech-recognition-with-past`` from a saved
    Whisper folder (model, feature extractor, tokenizer), then ``serfswap generate OUT a.wav
    b.wav``: the feature extractor's log-mel frames, torch's tokens decoded. The extractor is
    sized to the small model: 1 s at 3200 Hz, hop 100 -> 32 frames of 8 mel bins."""
    model = serf_seq2seq("whisper")
    source = tmp_path / "whisper"
    model.save_pretrained(source)
    save_tokenizer(source)
    rate = 3200
    extractor = transformers.WhisperFeatureExtractor(
        feature_size=8, sampling_rate=rate, hop_length=100, chunk_length=1, n_fft=128
    )
    extractor.save_pretrained(source)
    out = tmp_path / "onnx"
    task = "automatic-speech-recognition-with-past"
    # --convert: Whisper's convolutions call F.gelu, which no config names, so a Serf Whisper
    # loads from its folder with those two GELUs back (the in-memory model has Serf there)
    assert main(["export", str(source), str(out), "--task", task, "--convert"]) == 0
    assert (out / "preprocessor_config.json").is_file()
    waves = []
    for index, seconds in enumerate((1.0, 0.6)):  # the second is padded by the extractor
        time = np.arange(int(rate * seconds)) / rate
        samples = 0.5 * np.sin(2 * np.pi * (220 + 300 * index) * time)
        write_wav(tmp_path / f"{index}.wav", samples, rate)
        pcm = np.round(samples * 32767).astype(np.int16)  # what the file holds
        waves.append(pcm.astype(np.float32) / 32768.0)
    capsys.readouterr()
    wavs = [str(tmp_path / f"{index}.wav") for index in range(2)]
    assert main(["generate", str(out), "--max-new-tokens", str(NEW_TOKENS), *wavs]) == 0
    printed = capsys.readouterr().out.splitlines()
    features = extractor(waves, sampling_rate=rate, return_tensors="pt")["input_features"]
    with torch.no_grad():
        tokens = transformers.GenerationMixin.generate(
            model, input_features=features, max_new_tokens=NEW_TOKENS, do_sample=False
        )
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert printed == tokenizer.batch_decode(tokens, skip_special_tokens=True)
    assert len(printed) == 2 and all(line.strip() for line in printed)


def test_the_command_line_refuses_a_decoder_with_a_seq2seq_task_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    capsys.readouterr()
    code = main(["export", str(tmp_path / "gpt2"), str(tmp_path / "out"), "--task", TEXT2TEXT])
    err = capsys.readouterr().err
    assert code == 2
    errors = [line for line in err.splitlines() if not line.startswith("serfswap export: note")]
    assert len(errors) == 1 and errors[0].startswith("serfswap export: error: task "), err
    assert "gpt2 (GPT2LMHeadModel)" in errors[0] and "text-generation-with-past" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]
