"""Loading, round 3 (issue 24): remote code at any depth, pickles read two ways, outputs onto
inputs, files that hang or eat memory, and serfswap's own output loaded back.

Same method as ``test_security.py``: each payload is first shown to run through the plain
library (so that no test passes because its payload is broken), then refused by the CLI in a
subprocess, with ``y`` lines on stdin (as ``yes |`` gives) and with a silent pipe (a prompt
would wait there): the marker never appears, the command fails with one line on stderr.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.support.cli import cli as serfswap_cli
from tests.support.models import tiny_bert_config, tiny_resnet

from .test_security import _env, assert_refused, cli, python, touch

timm = pytest.importorskip("timm", reason="timm is in the [timm] extra")
transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")

PROMPT = "Do you wish to run the custom code"


def cli_silent(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The CLI with stdin a pipe that stays open and says nothing: a prompt would wait on it
    (transformers' own timeout is 15 s), a command that never asks does not."""
    read, write = os.pipe()
    try:
        return serfswap_cli(*argv, stdin=read, cwd=cwd, env=_env(cwd))
    finally:
        os.close(read)
        os.close(write)


def both_stdins(*argv: str, cwd: Path) -> list[subprocess.CompletedProcess[str]]:
    """The command run with ``yes``-style stdin and with a silent pipe; never prompted."""
    results = [cli(*argv, cwd=cwd), cli_silent(*argv, cwd=cwd)]
    for result in results:
        assert PROMPT not in result.stdout + result.stderr, result.stdout[-2000:]
    return results


# Nested auto_map -----------------------------------------------------------------------------


def _tiny_bert() -> dict[str, object]:
    config = tiny_bert_config()
    return config.to_dict()


def _evil_module(folder: Path, marker: Path, name: str, body: str) -> None:
    (folder / f"{name}.py").write_text(touch(marker) + "\n" + textwrap.dedent(body))


def _detr_config(folder: Path, marker: Path) -> dict[str, object]:
    """A DETR config (a type transformers knows) whose backbone_config (a BERT) points its
    AutoBackbone at ``folder``'s modeling_evil.py, in the ``repo--module.Class`` form."""
    folder.mkdir(exist_ok=True)
    _evil_module(folder, marker, "modeling_evil", "class EvilBackbone:\n    pass\n")
    code = f"{folder}--modeling_evil.EvilBackbone"
    backbone = {**_tiny_bert(), "auto_map": {"AutoBackbone": code}}
    config = transformers.DetrConfig(
        use_timm_backbone=False, backbone_config=backbone, d_model=16, encoder_layers=1,
        decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=16, decoder_ffn_dim=16, num_queries=5, use_pretrained_backbone=False,
    )  # fmt: skip
    config.save_pretrained(folder)
    return json.loads((folder / "config.json").read_text())


def _nested_runs_through_transformers(folder: Path, marker: Path, tmp_path: Path) -> None:
    """The control: transformers builds the model from the config, is asked, and ``y`` runs
    the folder's code."""
    code = (f"import transformers\ntry:\n    c = transformers.AutoConfig.from_pretrained("
            f"{str(folder)!r})\n    transformers.AutoModel.from_config(c)\nexcept Exception:\n"
            "    pass")  # fmt: skip
    result = python(code, tmp_path)
    assert marker.exists(), f"the payload is broken, the test would prove nothing: {result}"
    marker.unlink()


def test_nested_auto_map_in_a_folder_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "detr"
    _detr_config(folder, marker)
    _nested_runs_through_transformers(folder, marker, tmp_path)
    from safetensors.torch import save_file  # weights: transformers gets as far as the model

    save_file({"w": torch.zeros(1)}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for result in both_stdins("inspect", str(folder), cwd=tmp_path):
        assert_refused(result, marker, "backbone_config.auto_map")


def test_nested_auto_map_through_arch_never_runs(tmp_path: Path) -> None:
    """--arch hf:DIR for a weights-only file: the config is read, never handed on."""
    from safetensors.torch import save_file

    marker = tmp_path / "pwned"
    folder = tmp_path / "detr"
    _detr_config(folder, marker)
    save_file({"w": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    argv = ("inspect", str(tmp_path / "w.safetensors"), "--arch", f"hf:{folder}")
    for result in both_stdins(*argv, cwd=tmp_path):
        assert_refused(result, marker, "backbone_config.auto_map")


def test_nested_auto_map_in_checkpoint_metadata_never_runs(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    marker = tmp_path / "pwned"
    folder = tmp_path / "detr"
    config = _detr_config(folder, marker)
    _nested_runs_through_transformers(folder, marker, tmp_path)
    metadata = {
        "format": "serfswap-checkpoint/1",
        "arch": json.dumps({"kind": "hf", "config": config}),
        "swap": json.dumps({"activations": [], "sites": []}),
    }
    save_file({"w": torch.zeros(1)}, str(tmp_path / "c.safetensors"), metadata=metadata)
    for result in both_stdins("inspect", str(tmp_path / "c.safetensors"), cwd=tmp_path):
        assert_refused(result, marker, "backbone_config.auto_map")


def test_laundering_through_serfswap_output_never_runs(tmp_path: Path) -> None:
    """A pickled DETR that loads safely, whose config carries the nested auto_map: convert
    writes a checkpoint without it, and inspecting that checkpoint runs nothing."""
    from safetensors import safe_open

    marker = tmp_path / "pwned"
    folder = tmp_path / "code"
    folder.mkdir()
    _evil_module(folder, marker, "modeling_evil", "class EvilBackbone:\n    pass\n")
    resnet = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 8, 8],
                                       depths=[1, 1, 1, 1], out_features=["stage4"])  # fmt: skip
    config = transformers.DetrConfig(
        use_timm_backbone=False, backbone_config=resnet, d_model=16, encoder_layers=1,
        decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=16, decoder_ffn_dim=16, num_queries=5, use_pretrained_backbone=False,
    )  # fmt: skip
    model = transformers.DetrModel(config)
    backbone = tiny_bert_config()
    backbone.auto_map = {"AutoBackbone": f"{folder}--modeling_evil.EvilBackbone"}
    model.config.backbone_config = backbone
    torch.save(model, tmp_path / "detr.pt")
    control = (f"import torch, transformers\nm = torch.load({str(tmp_path / 'detr.pt')!r}, "
               "weights_only=False)\ntry:\n    transformers.AutoModel.from_config(m.config)\n"
               "except Exception:\n    pass")  # fmt: skip
    assert marker.exists() is False
    python(control, tmp_path)
    assert marker.exists(), "the payload is broken, the test would prove nothing"
    marker.unlink()

    out = tmp_path / "c.safetensors"
    result = cli("convert", str(tmp_path / "detr.pt"), "-o", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with safe_open(str(out), framework="pt") as f:
        arch = f.metadata()["arch"]
    assert "auto_map" not in arch and "modeling_evil" not in arch, arch
    assert json.loads(arch)["config"]["backbone_config"]["model_type"] == "bert"
    for result in both_stdins("inspect", str(out), cwd=tmp_path):
        assert not marker.exists(), f"the folder's code ran: {result.stderr[-2000:]}"
        assert result.returncode != 0  # a BERT is no backbone: transformers says so
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_rag_tokenizer_subfolder_code_never_runs(tmp_path: Path) -> None:
    """RagTokenizer loads question_encoder_tokenizer/ without the caller's trust_remote_code:
    its auto_map makes transformers ask, and ``y`` runs the folder's code."""
    marker = tmp_path / "pwned"
    tok = tmp_path / "tok"
    question, generator = tok / "question_encoder_tokenizer", tok / "generator_tokenizer"
    question.mkdir(parents=True)
    generator.mkdir()
    body = """
        from transformers import PreTrainedTokenizer
        class EvilTokenizer(PreTrainedTokenizer):
            pass
    """
    _evil_module(tok, marker, "evil_tok", body)
    (question / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "EvilTokenizer",
        "auto_map": {"AutoTokenizer": ["evil_tok.EvilTokenizer", None]},
    }))  # fmt: skip
    bert_tokenizer = {"tokenizer_class": "BertTokenizer"}
    (generator / "tokenizer_config.json").write_text(json.dumps(bert_tokenizer))
    (tok / "config.json").write_text(json.dumps({
        "model_type": "rag", "question_encoder": {"model_type": "resnet"},
        "generator": _tiny_bert(),
    }))  # fmt: skip
    (tok / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "RagTokenizer"}))
    control = (f"import transformers\ntry:\n    transformers.AutoTokenizer.from_pretrained("
               f"{str(tok)!r}, trust_remote_code=False)\nexcept Exception:\n    pass")  # fmt: skip
    python(control, tmp_path)
    assert marker.exists(), "the payload is broken, the test would prove nothing"
    marker.unlink()

    cfg = tiny_bert_config()
    transformers.BertModel(cfg).save_pretrained(tmp_path / "model")
    (tmp_path / "data.txt").write_text("\n".join(f"line {i}" for i in range(8)))
    out = tmp_path / "o.safetensors"
    argv = ("recover", str(tmp_path / "model"), "--data", str(tmp_path / "data.txt"),
            "--tokenizer", str(tok), "--steps", "1", "-o", str(out))  # fmt: skip
    for result in both_stdins(*argv, cwd=tmp_path):
        assert_refused(result, marker, "question_encoder_tokenizer", "auto_map",
                       "--trust-remote-code", after=True)  # fmt: skip
        assert not out.exists()


def test_never_ask_makes_transformers_refuse_without_reading_stdin(tmp_path: Path) -> None:
    """The process-wide answer: after serfswap loads anything from transformers, a nested
    remote-code load elsewhere in the process fails at once instead of prompting."""
    marker = tmp_path / "pwned"
    folder = tmp_path / "detr"
    _detr_config(folder, marker)
    code = textwrap.dedent(f"""
        import transformers
        from serfswap.io.remote_code import never_ask
        never_ask()
        c = transformers.AutoConfig.from_pretrained({str(folder)!r})
        try:
            transformers.AutoModel.from_config(c)
        except ValueError as exc:
            print("refused:", str(exc).splitlines()[0])
    """)
    result = python(code, tmp_path)
    assert not marker.exists(), result.stdout
    assert "refused: Loading this model requires you to execute custom code" in result.stdout
    assert PROMPT not in result.stdout, result.stdout


# One reading of each pickle ----------------------------------------------------------------------


def _linear_called(in_features: int, out_features: int) -> bytes:
    """A pickle that *calls* nn.Linear(in, out): what the scan refuses (REDUCE on a class)."""
    return (b"\x80\x04\x8c\x17torch.nn.modules.linear\x8c\x06Linear\x93(K"
            + bytes([in_features]) + b"K" + bytes([out_features]) + b"tR.")  # fmt: skip


def _archive_with_extra(path: Path, extra_name: str, extra: bytes, *, first: bool) -> Path:
    """torch.save(nn.Linear(4, 4)) with one more member ``archive/<extra_name>`` holding
    ``extra``, before or after the real members."""
    import io
    import warnings
    import zipfile

    buffer = io.BytesIO()
    torch.save(torch.nn.Linear(4, 4), buffer)
    buffer.seek(0)
    with (
        zipfile.ZipFile(buffer) as src,
        zipfile.ZipFile(path, "w") as dst,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate name it writes
        top = src.infolist()[0].filename.split("/")[0]
        if first:
            dst.writestr(f"{top}/{extra_name}", extra)
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        if not first:
            dst.writestr(f"{top}/{extra_name}", extra)
    return path


def test_archive_with_two_data_pkl_is_refused(tmp_path: Path) -> None:
    """zipfile reads the last of two equal names, torch another: the scan would judge one
    pickle and torch unpickle the other."""
    import zipfile

    evil = _archive_with_extra(tmp_path / "dup.pt", "data.pkl", _linear_called(3, 5), first=False)
    with zipfile.ZipFile(evil) as archive:
        assert archive.read("archive/data.pkl") == _linear_called(3, 5)  # what zipfile reads
    assert torch.load(evil, weights_only=False).in_features == 4  # what torch reads: another
    result = cli("inspect", str(evil), cwd=tmp_path)
    assert_refused(result, tmp_path / "never", "two members", "data.pkl", "--trust-pickle")


@pytest.mark.parametrize("first", [True, False], ids=["first", "last"])
def test_archive_with_case_colliding_names_is_refused(first: bool, tmp_path: Path) -> None:
    """torch finds a record ignoring case: ``archive/DATA.PKL`` is a data.pkl to it and not to
    an exact lookup, so two such members are two readings."""
    import io
    import zipfile

    only_upper = io.BytesIO()
    buffer = io.BytesIO()
    torch.save(torch.nn.Linear(4, 4), buffer)
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(only_upper, "w") as dst:
        for info in src.infolist():
            name = info.filename.replace("data.pkl", "DATA.PKL")
            dst.writestr(name, src.read(info))
    only_upper.seek(0)
    assert torch.load(only_upper, weights_only=False).in_features == 4  # torch ignores case
    evil = _archive_with_extra(tmp_path / "case.pt", "DATA.PKL", _linear_called(3, 5), first=first)
    result = cli("inspect", str(evil), cwd=tmp_path)
    assert_refused(result, tmp_path / "never", "two members", "ignoring case", "--trust-pickle")


def test_legacy_pickle_with_a_zip_appended_is_refused(tmp_path: Path) -> None:
    """torch reads a file as a zip only when it starts with one; zipfile finds an archive at
    the end. A leading pickle with a benign archive appended was scanned as the archive."""
    import io

    from .test_security import call

    marker = tmp_path / "pwned"
    benign = io.BytesIO()
    torch.save({"w": torch.zeros(1)}, benign)
    evil = tmp_path / "appended.pt"
    evil.write_bytes(call("os", "system", f"touch {marker}") + benign.getvalue())
    python(f"import torch\ntry:\n    torch.load({str(evil)!r}, weights_only=False)\n"
           "except Exception:\n    pass", tmp_path)  # fmt: skip
    assert marker.exists(), "the payload is broken, the test would prove nothing"
    marker.unlink()
    result = cli("inspect", str(evil), cwd=tmp_path)
    assert_refused(result, marker, "zip archive appended", "--trust-pickle")


def _peak_rss_mb(argv: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    """The CLI's exit and its peak resident memory (MB), measured by a wrapper process whose
    only child it is."""
    code = textwrap.dedent(f"""
        import resource, subprocess, sys
        r = subprocess.run([sys.executable, "-m", "serfswap", *{argv!r}], capture_output=True,
                           text=True, stdin=subprocess.DEVNULL)
        sys.stderr.write(r.stderr)
        print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, cwd=cwd, env=_env(cwd), check=False)  # fmt: skip
    status, peak_kb = result.stdout.split()
    result.returncode = int(status)
    return int(peak_kb) / 1024, result


def test_opcode_bomb_is_refused_fast_and_small(tmp_path: Path) -> None:
    """A 20 MiB data.pkl of NONE/POP deflates to a few KB; followed opcode by opcode, kept in a
    list, it took 46 s and 2.9 GB. Now the scan stops at its opcode limit."""
    import time
    import zipfile

    from .test_security import call, torch_zip

    bomb = tmp_path / "bomb.pt"
    torch_zip(tmp_path / "plain.pt", b"\x80\x02" + b"N0" * (10 * 2**20) + b"}.")
    with zipfile.ZipFile(tmp_path / "plain.pt") as src, zipfile.ZipFile(bomb, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 100_000
    small = torch_zip(tmp_path / "small.pt", call("torch", "os.system", "true"))
    baseline, refused = _peak_rss_mb(["inspect", str(small)], tmp_path)  # same path, tiny file
    assert_refused(refused, tmp_path / "never", "os.system")
    start = time.monotonic()
    peak, result = _peak_rss_mb(["inspect", str(bomb)], tmp_path)
    elapsed = time.monotonic() - start
    assert_refused(result, tmp_path / "never", "more than", "opcodes")
    assert peak < baseline + 200, f"{peak:.0f} MB against {baseline:.0f} MB for a small file"
    assert elapsed < 60, f"{elapsed:.0f} s"


def test_memo_bomb_is_refused(tmp_path: Path) -> None:
    from serfswap.io import pickle_scan

    from .test_security import torch_zip

    entries = pickle_scan.MAX_MEMO + 10
    assert 3 * entries < pickle_scan.MAX_OPCODES  # the memo limit, not the opcode one, is hit
    evil = torch_zip(tmp_path / "memo.pt", b"\x80\x04" + b"N\x940" * entries + b"}.")
    result = cli("inspect", str(evil), cwd=tmp_path)
    assert_refused(result, tmp_path / "never", "memo exceeds")


# Outputs never onto inputs -----------------------------------------------------------------------


@pytest.fixture
def recover_inputs(tmp_path: Path) -> dict[str, Path]:
    """Real inputs of `recover timm:test_resnet --weights W --data IMAGES`, and links to them."""
    from PIL import Image
    from safetensors.torch import save_file

    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(images / f"{i}.png")
    weights = tmp_path / "w.safetensors"
    save_file(tiny_resnet().state_dict(), str(weights))
    (tmp_path / "link-to-weights").symlink_to(weights)
    (tmp_path / "link-to-image").symlink_to(images / "0.png")
    return {"weights": weights, "images": images, "image": images / "0.png",
            "weights-link": tmp_path / "link-to-weights",
            "image-link": tmp_path / "link-to-image"}  # fmt: skip


def _recover_argv(inputs: dict[str, Path], tmp_path: Path, *extra: str) -> list[str]:
    return ["recover", "timm:test_resnet", "--weights", str(inputs["weights"]), "--data",
            str(inputs["images"]), "--steps", "1", "--batch-size", "2",
            "-o", str(tmp_path / "out.safetensors"), *extra]  # fmt: skip


@pytest.mark.parametrize("option", ["--log", "--plot"])
@pytest.mark.parametrize("target", ["weights", "weights-link", "image", "image-link"])
def test_side_outputs_never_overwrite_an_input(
    option: str, target: str, recover_inputs: dict[str, Path], tmp_path: Path
) -> None:
    before = {k: p.read_bytes() for k, p in recover_inputs.items() if p.is_file()}
    argv = _recover_argv(recover_inputs, tmp_path, option, str(recover_inputs[target]))
    result = cli(*argv, cwd=tmp_path)
    assert_refused(result, tmp_path / "never", "write somewhere else")
    assert result.returncode == 2
    assert {k: p.read_bytes() for k, p in recover_inputs.items() if p.is_file()} == before
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("where", ["images", "weights", "holds-weights"])
def test_checkpoint_folder_never_an_input(
    where: str, recover_inputs: dict[str, Path], tmp_path: Path
) -> None:
    """The checkpoint folder is not an input (folder or file), and holds no input in the
    step-* folders a fresh run removes (weights taken from an earlier run's checkpoint)."""
    folder = recover_inputs["images" if where == "images" else "weights"]
    if where == "holds-weights":
        folder = tmp_path / "ck"
        inner = folder / "step-00000001" / "model.safetensors"
        inner.parent.mkdir(parents=True)
        recover_inputs["weights"].rename(inner)
        recover_inputs["weights"] = inner
    argv = _recover_argv(recover_inputs, tmp_path, "--checkpoint-dir", str(folder))
    result = cli(*argv, cwd=tmp_path)
    assert_refused(result, tmp_path / "never")
    assert result.returncode == 2
    assert sorted(p.name for p in recover_inputs["images"].iterdir()) == [
        f"{i}.png" for i in range(6)
    ]
    assert recover_inputs["weights"].is_file()


def test_two_outputs_of_one_command_are_refused(
    recover_inputs: dict[str, Path], tmp_path: Path
) -> None:
    argv = _recover_argv(recover_inputs, tmp_path, "--log", str(tmp_path / "out.safetensors"))
    assert_refused(cli(*argv, cwd=tmp_path), tmp_path / "never", "one file")


# Files named by an index -------------------------------------------------------------------------


def _sharded_bert(folder: Path) -> list[str]:
    """A tiny BERT saved in several safetensors shards (an index names them); the shards."""
    cfg = tiny_bert_config()
    transformers.BertModel(cfg).save_pretrained(folder, max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    return shards


def test_index_naming_a_fifo_never_hangs(tmp_path: Path) -> None:
    folder = tmp_path / "bert"
    shard = _sharded_bert(folder)[-1]
    (folder / shard).unlink()
    os.mkfifo(folder / shard)
    control = f"import transformers\ntransformers.AutoModel.from_pretrained({str(folder)!r})"
    with pytest.raises(subprocess.TimeoutExpired):  # the plain library blocks on the FIFO
        subprocess.run([sys.executable, "-c", control], capture_output=True, timeout=20,
                       env=_env(tmp_path), check=False)  # fmt: skip
    result = cli("inspect", str(folder), cwd=tmp_path)
    assert_refused(result, tmp_path / "never", shard, "not a regular file")


def test_index_naming_a_file_outside_the_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "bert"
    shard = _sharded_bert(folder)[-1]
    (folder / shard).rename(tmp_path / shard)
    index = folder / "model.safetensors.index.json"
    entries = json.loads(index.read_text())
    entries["weight_map"] = {k: (f"../{v}" if v == shard else v)
                             for k, v in entries["weight_map"].items()}  # fmt: skip
    index.write_text(json.dumps(entries))
    result = cli("inspect", str(folder), cwd=tmp_path)
    assert_refused(result, tmp_path / "never", f"../{shard}", "not a file inside the folder")


def test_a_fifo_among_a_tokenizer_folders_files_is_refused(tmp_path: Path) -> None:
    cfg = tiny_bert_config()
    transformers.BertModel(cfg).save_pretrained(tmp_path / "model")
    tok = tmp_path / "tok"
    tok.mkdir()
    os.mkfifo(tok / "tokenizer_config.json")
    (tmp_path / "data.txt").write_text("\n".join(f"line {i}" for i in range(8)))
    out = tmp_path / "o.safetensors"
    argv = ("recover", str(tmp_path / "model"), "--data", str(tmp_path / "data.txt"),
            "--tokenizer", str(tok), "--steps", "1", "-o", str(out))  # fmt: skip
    result = cli(*argv, cwd=tmp_path)
    assert_refused(result, tmp_path / "never", "tokenizer_config.json", "not a regular file",
                   after=True)  # fmt: skip


# serfswap loads its own output -------------------------------------------------------------------


def _tiny_llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1)  # fmt: skip
    return transformers.LlamaForCausalLM(config)


CONVERTED = {
    "transformer-encoder-layer": (lambda: torch.nn.TransformerEncoderLayer(8, 2, 16),
                                  lambda: (torch.randn(2, 3, 8),)),
    "llama": (_tiny_llama, lambda: (torch.randint(0, 64, (1, 5)),)),
    "bert": (lambda: transformers.BertModel(tiny_bert_config()),
             lambda: (torch.randint(0, 99, (1, 5)),)),
    "timm-test-resnet": (tiny_resnet,
                         lambda: (torch.randn(1, 3, 32, 32),)),
}  # fmt: skip


def _output(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    out = model.eval()(*inputs)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("name", sorted(CONVERTED))
def test_a_pickled_converted_model_loads_through_the_safe_loader(name: str, tmp_path: Path) -> None:
    """torch.save(serfswap.convert(model)) loads with the allowlist alone (FunctionInfo,
    SerfFunction, the report), and computes what the converted model computed."""
    import serfswap
    from serfswap.io.load import load_model

    build, inputs = CONVERTED[name]
    converted = serfswap.convert(build()).eval()
    torch.save(converted, tmp_path / "serf.pt")
    loaded = load_model(str(tmp_path / "serf.pt"))
    assert type(loaded.model) is type(converted)
    example = inputs()
    with torch.no_grad():
        torch.testing.assert_close(_output(loaded.model, example), _output(converted, example))


def test_inspect_reads_a_pickled_converted_layer(tmp_path: Path) -> None:
    import serfswap

    torch.save(serfswap.convert(torch.nn.TransformerEncoderLayer(8, 2, 16)), tmp_path / "p.pt")
    result = cli("inspect", str(tmp_path / "p.pt"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "FunctionInfo" not in result.stderr


# Resource limits and names -----------------------------------------------------------------------


def _config_with_slot_state(num_labels: int) -> bytes:
    """A BertConfig created as torch.save does (NEWOBJ), then BUILD with ``(None, {"num_labels":
    n})``: slot state, which the unpickler sets with setattr, running the property setter."""
    # Protocol 2, as torch.save writes and torch's weights-only unpickler reads: GLOBAL,
    # EMPTY_TUPLE NEWOBJ, then NONE, a dict (BINUNICODE key, BININT value), TUPLE2 BUILD.
    return (b"\x80\x02ctransformers.models.bert.configuration_bert\nBertConfig\n)\x81"
            + b"N}X\x0a\x00\x00\x00num_labelsJ" + num_labels.to_bytes(4, "little")
            + b"s\x86b.")  # fmt: skip


def test_config_setters_never_run_from_build(tmp_path: Path) -> None:
    import time

    from .test_security import torch_zip

    small = torch_zip(tmp_path / "small.pt", _config_with_slot_state(7))
    with torch.serialization.safe_globals([transformers.BertConfig]):  # serfswap's old table
        loaded = torch.load(small, weights_only=True)
    assert loaded.id2label == {i: f"LABEL_{i}" for i in range(7)}  # the setter ran
    evil = torch_zip(tmp_path / "labels.pt", _config_with_slot_state(2**31 - 1))
    start = time.monotonic()
    result = cli("inspect", str(evil), cwd=tmp_path)
    assert_refused(result, tmp_path / "never", "slot state", "--trust-pickle")
    assert time.monotonic() - start < 60


def test_module_names_that_are_not_identifiers_are_refused(tmp_path: Path) -> None:
    name = 'act"); import os; os.system("true'
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model._modules[name] = torch.nn.ReLU()  # add_module refuses only dots
    torch.save(model, tmp_path / "names.pt")
    assert name in torch.load(tmp_path / "names.pt", weights_only=False)._modules
    result = cli("inspect", str(tmp_path / "names.pt"), cwd=tmp_path)
    assert_refused(result, tmp_path / "never", "not an identifier", "act")


def test_arch_hf_compares_sizes_without_allocating_them(tmp_path: Path) -> None:
    """A config whose vocab_size asks for 2.5 GB of embeddings: --arch hf:DIR used to build
    it at full size before finding that the weights do not match."""
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    peaks = {}
    for name, vocab in (("small", 99), ("huge", 20_000_000)):  # same path, same imports
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**_tiny_bert(), "vocab_size": vocab}))
        argv = ["inspect", str(tmp_path / "w.safetensors"), "--arch", f"hf:{folder}"]
        peaks[name], result = _peak_rss_mb(argv, tmp_path)
        assert_refused(result, tmp_path / "never", "do not match the architecture")
    assert peaks["huge"] < peaks["small"] + 200, peaks


def test_checkpoint_timm_kwargs_cannot_name_files(tmp_path: Path) -> None:
    """arch.kwargs {"checkpoint_path": FILE} made timm open another file (180 lines of
    warnings, then an error); a FIFO there would block it."""
    from safetensors.torch import save_file

    os.mkfifo(tmp_path / "fifo")
    metadata = {
        "format": "serfswap-checkpoint/1",
        "arch": json.dumps({"kind": "timm", "name": "test_resnet",
                            "kwargs": {"checkpoint_path": str(tmp_path / "fifo")}}),
        "swap": json.dumps({"activations": [], "sites": []}),
    }  # fmt: skip
    save_file({"w": torch.zeros(1)}, str(tmp_path / "c.safetensors"), metadata=metadata)
    result = cli("inspect", str(tmp_path / "c.safetensors"), cwd=tmp_path)
    assert_refused(result, tmp_path / "never", "arch.kwargs (checkpoint_path)")


def test_remote_code_keys_are_found_at_any_depth_and_stripped() -> None:
    """Lists of configs and trust_remote_code fields too; what serfswap writes has none."""
    from serfswap.io.remote_code import find_remote_code, without_remote_code

    config = {"model_type": "x", "sub": [{"a": 1}, {"deeper": {"trust_remote_code": True}}],
              "other": {"auto_map": {"AutoModel": "user/repo--m.C"}}}  # fmt: skip
    assert find_remote_code(config) in ("sub[1].deeper.trust_remote_code", "other.auto_map")
    assert find_remote_code({"auto_map": {}}, skip_top=frozenset({"auto_map"})) is None
    assert find_remote_code({"x": {"auto_map": {}}}, skip_top=frozenset({"auto_map"})) == (
        "x.auto_map"
    )
    stripped = without_remote_code(config)
    assert find_remote_code(stripped) is None
    assert stripped == {"model_type": "x", "sub": [{"a": 1}, {"deeper": {}}], "other": {}}
    deep: dict[str, object] = {}
    node = deep
    for _ in range(5_000):  # deeper than Python's recursion limit: still found, no crash
        node["n"] = {}
        node = node["n"]  # type: ignore[assignment]
    node["auto_map"] = {}
    assert find_remote_code(deep).endswith(".n.auto_map")


def _kernels_rebuilder() -> str:
    """The dotted name kernels pickles its wrappers with, in the installed version."""
    pytest.importorskip("kernels", reason="the hub-kernel wrapper needs the kernels package")
    from transformers.utils.import_utils import is_kernels_available

    if not is_kernels_available():
        pytest.skip("transformers does not use the installed kernels version")
    for module in ("kernels.layer.layer", "kernels._internals.layer.layer"):
        try:
            if hasattr(__import__(module, fromlist=["_"]), "_rebuild_kernel_func"):
                return f"{module}._rebuild_kernel_func"
        except ImportError:
            continue
    pytest.skip("no _rebuild_kernel_func in this kernels version")


def test_hub_kernel_wrapper_never_imports_what_the_file_names(tmp_path: Path) -> None:
    """kernels' _rebuild_kernel_func(module, name) imports any module: serfswap rebuilds only
    wrappers transformers' modeling modules define (a pickled LLaMA's rotary wrapper loads in
    test_a_pickled_converted_model_loads_through_the_safe_loader), and refuses the rest."""
    from .test_security import torch_zip

    module, _, function = _kernels_rebuilder().rpartition(".")
    marker = tmp_path / "pwned"
    (tmp_path / "evil_mod.py").write_text(touch(marker) + "\nx = 1\n")
    payload = (b"\x80\x02" + f"c{module}\n{function}\n".encode()
               + b"(X\x08\x00\x00\x00evil_modX\x01\x00\x00\x00xtR.")  # fmt: skip
    evil = torch_zip(tmp_path / "kernel.pt", payload)
    python(f"import torch\ntry:\n    torch.load({str(evil)!r}, weights_only=False)\n"
           "except Exception:\n    pass", tmp_path)  # fmt: skip
    assert marker.exists(), "the payload is broken, the test would prove nothing"
    marker.unlink()
    result = cli("inspect", str(evil), cwd=tmp_path)
    assert_refused(result, marker, "hub kernel evil_mod.x", "--trust-pickle")
    llama = torch_zip(
        tmp_path / "class.pt",
        payload.replace(
            b"X\x08\x00\x00\x00evil_modX\x01\x00\x00\x00x",
            b"X(\x00\x00\x00transformers.models.llama.modeling_llamaX\n\x00\x00\x00LlamaModel",
        ),
    )
    result = cli("inspect", str(llama), cwd=tmp_path)  # a class there, not a kernel wrapper
    assert_refused(result, marker, "hub kernel transformers.models.llama.modeling_llama.Llama")


@pytest.mark.parametrize(
    ("sig", "status", "word"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
)
def test_a_signal_ends_a_load_in_one_line(sig: int, status: int, word: str, tmp_path: Path) -> None:
    """Ctrl-C or SIGTERM while a HuggingFace folder loads (recover says "loading" first, then
    imports transformers and reads the folder): status 130 / 143, one line, nothing written."""
    import time

    cfg = tiny_bert_config()
    transformers.BertModel(cfg).save_pretrained(tmp_path / "model")
    (tmp_path / "data.txt").write_text("\n".join(f"line {i}" for i in range(8)))
    out = tmp_path / "o.safetensors"
    process = subprocess.Popen(
        [sys.executable, "-m", "serfswap", "recover", str(tmp_path / "model"), "--data",
         str(tmp_path / "data.txt"), "--steps", "1", "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
        env=_env(tmp_path),
    )  # fmt: skip
    assert process.stdout is not None
    line = process.stdout.readline()  # "loading ...", flushed before the load starts
    assert line.startswith("loading"), line
    time.sleep(0.2)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and word in lines[0], err
    assert not out.exists()
