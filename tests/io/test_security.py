"""Every loader tried as an attacker would: files that run code when loaded the usual way.

Each route builds a malicious file whose payload creates a marker file, shows that the payload
really runs when the file is loaded the usual (unsafe) way — so that no test here can pass
because its payload is broken — and then runs the CLI on it in a subprocess, with "y" lines
on stdin (``yes |``), asserting that the marker never appears and that the command fails.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.support import cli as support_cli
from tests.support.models import tiny_bert_config, tiny_resnet

timm = pytest.importorskip("timm", reason="timm is in the [timm] extra")
transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")

YES = "y\n" * 1000  # what `yes |` would feed to any prompt


# Building pickles by hand -------------------------------------------------------------------------


def _encode(value: object) -> bytes:
    """Pickle opcodes (protocol 4) for a str, tuple or dict of those, written out by hand."""
    if isinstance(value, str):
        raw = value.encode()
        if len(raw) < 256:
            return b"\x8c" + bytes([len(raw)]) + raw  # SHORT_BINUNICODE
        return b"X" + len(raw).to_bytes(4, "little") + raw  # BINUNICODE
    if isinstance(value, tuple):
        return b"(" + b"".join(map(_encode, value)) + b"t"  # MARK ... TUPLE
    if isinstance(value, dict):
        items = b"".join(_encode(k) + _encode(v) for k, v in value.items())
        return b"}(" + items + b"u"  # EMPTY_DICT MARK ... SETITEMS
    raise TypeError(value)


def call(module: str, name: str, *args: object) -> bytes:
    """A pickle that resolves ``module`` + ``name`` (dotted names allowed) and calls it."""
    return b"\x80\x04" + _encode(module) + _encode(name) + b"\x93" + _encode(args) + b"R."


def torch_zip(path: Path, payload: bytes) -> Path:
    """A torch.save archive whose data.pkl is ``payload``."""
    buffer = io.BytesIO()
    torch.save({}, buffer)
    buffer.seek(0)
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            is_pickle = info.filename.endswith("/data.pkl")
            dst.writestr(info, payload if is_pickle else src.read(info))
    return path


def touch(marker: Path) -> str:
    return f"import pathlib; pathlib.Path({str(marker)!r}).touch()"


# Running things in a subprocess -------------------------------------------------------------------


def python(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return support_cli.python("-c", code, input=YES, cwd=tmp_path, env=_env(tmp_path))


def cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return support_cli.cli(*argv, input=YES, cwd=cwd, env=_env(cwd))


def _env(tmp_path: Path) -> dict[str, str]:
    # transformers copies dynamic modules into HF_HOME: keep that inside the test's folder.
    return {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}


def assert_refused(
    result: subprocess.CompletedProcess[str], marker: Path, *words: str, after: bool = False
) -> None:
    """The marker is absent, the status non-zero, the error one line that says ``words``.
    ``after``: other output (progress of earlier loading) may come before that line."""
    assert not marker.exists(), f"the file's code ran: {result.stderr[-2000:]}"
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 or after, result.stderr
    assert lines[-1].startswith("serfswap "), result.stderr
    for word in words:
        assert word in lines[-1], lines[-1]


def unsafe_load_runs_it(path: Path, marker: Path, tmp_path: Path, loader: str) -> None:
    """The control: the usual way of loading ``path`` does run its payload."""
    result = python(f"import torch\ntry:\n    ({loader})({str(path)!r})\nexcept Exception:\n"
                    "    pass", tmp_path)  # fmt: skip
    assert marker.exists(), f"the payload is broken, the test would prove nothing: {result}"
    marker.unlink()


# Pickles ------------------------------------------------------------------------------------------


def _fx_forward_from_src(tmp: Path, marker: Path) -> bytes:
    source = touch(marker) + "\ndef forward(self):\n    return None\n"
    return call("torch.fx.graph_module", "_forward_from_src", source, {})


def _fx_reduce_graph_module(tmp: Path, marker: Path) -> bytes:
    body = {"_code": "\ndef forward(self):\n    return None\n"}
    return call("torch.fx.graph_module", "reduce_graph_module", body, touch(marker) + "\n")


def _torch_save_writes(tmp: Path, marker: Path) -> bytes:
    return call("torch.serialization", "save", "anything", str(marker))


def _hub_load_local(tmp: Path, marker: Path) -> bytes:
    hub = tmp / "hub"
    hub.mkdir()
    (hub / "hubconf.py").write_text(touch(marker) + "\n")
    return call("torch.hub", "_load_local", str(hub), "model")


def _transformers_dynamic_module(tmp: Path, marker: Path) -> bytes:
    repo = tmp / "repo"
    repo.mkdir()
    (repo / "evil.py").write_text(touch(marker) + "\nclass Evil:\n    pass\n")
    module = "transformers.dynamic_module_utils"
    return call(module, "get_class_from_dynamic_module", "evil.Evil", str(repo))


def _dotted_os_system(tmp: Path, marker: Path) -> bytes:
    return call("torch", "os.system", f"touch {marker}")


def _dotted_exec(tmp: Path, marker: Path) -> bytes:
    return call("torch", "builtins.exec", touch(marker))


def _dotted_through_allowed_module(tmp: Path, marker: Path) -> bytes:
    # A module serfswap may import to find classes, and a dotted path out of it to os.system.
    return call("torch.nn.modules.module", "torch.os.system", f"touch {marker}")


def _dotted_timm(tmp: Path, marker: Path) -> bytes:
    return call("timm.layers", "torch.os.system", f"touch {marker}")


PICKLE_ROUTES: dict[str, Callable[[Path, Path], bytes]] = {
    "fx-forward-from-src": _fx_forward_from_src,
    "fx-reduce-graph-module": _fx_reduce_graph_module,
    "torch-serialization-save": _torch_save_writes,
    "torch-hub-load-local": _hub_load_local,
    "transformers-dynamic-module": _transformers_dynamic_module,
    "dotted-torch-os-system": _dotted_os_system,
    "dotted-torch-builtins-exec": _dotted_exec,
    "dotted-via-torch-nn-module": _dotted_through_allowed_module,
    "dotted-via-timm-layers": _dotted_timm,
}


@pytest.mark.parametrize("route", sorted(PICKLE_ROUTES))
def test_pickle_routes_never_run(route: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = torch_zip(tmp_path / "model.pt", PICKLE_ROUTES[route](tmp_path, marker))
    unsafe_load_runs_it(evil, marker, tmp_path, "lambda p: torch.load(p, weights_only=False)")
    assert_refused(cli("inspect", str(evil), cwd=tmp_path), marker, "--trust-pickle")


@pytest.mark.parametrize(
    "command",
    [
        ["inspect"],
        ["export", "{out}.onnx"],
        ["convert", "-o", "{out}.safetensors"],
        ["recover", "--data", "{data}", "--steps", "1", "-o", "{out}.safetensors"],
        ["export", "timm:test_resnet", "{out}.onnx", "--weights"],  # the file as --weights
    ],
    ids=["inspect", "export", "convert", "recover", "weights"],
)
def test_every_command_refuses_the_pickle(command: list[str], tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = torch_zip(tmp_path / "w.pt", _dotted_os_system(tmp_path, marker))
    (tmp_path / "data.txt").write_text("one\ntwo\nthree\n")
    args = [a.format(out=tmp_path / "out", data=tmp_path / "data.txt") for a in command]
    argv = [*args, str(evil)] if "--weights" in args else [args[0], str(evil), *args[1:]]
    assert_refused(cli(*argv, cwd=tmp_path), marker, "os.system", "--trust-pickle")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt", "w.pt"]


def test_legacy_format_pickle_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "legacy.pt"  # not a zip: torch's pre-1.6 format, or any raw pickle
    evil.write_bytes(call("os", "system", f"touch {marker}"))
    unsafe_load_runs_it(evil, marker, tmp_path, "lambda p: torch.load(p, weights_only=False)")
    assert_refused(cli("inspect", str(evil), cwd=tmp_path), marker, "--trust-pickle")


def test_allowed_class_called_with_arguments_is_refused(tmp_path: Path) -> None:
    """Allowed classes may only be created as torch.save does (__new__ plus state): calling one
    runs its __init__ on the file's arguments, and some constructors load models by name."""
    pickle = b"\x80\x04" + _encode("torch.nn.modules.linear") + _encode("Linear") + b"\x93"
    pickle += b"(K\x04K\x04tR."  # Linear(4, 4): BININT1 arguments
    evil = torch_zip(tmp_path / "called.pt", pickle)
    result = cli("inspect", str(evil), cwd=tmp_path)
    assert_refused(result, tmp_path / "never", "torch.nn.modules.linear.Linear", "--trust-pickle")


def test_a_real_pickled_model_loads_and_trust_pickle_opens_the_rest(tmp_path: Path) -> None:
    """The allowlist admits real models; --trust-pickle is the one way to the full unpickler."""
    model = tiny_resnet()
    torch.save(model, tmp_path / "full.pt")
    result = cli("inspect", str(tmp_path / "full.pt"), cwd=tmp_path)
    assert result.returncode == 0 and "to convert" in result.stdout, result.stderr
    marker = tmp_path / "pwned"
    evil = torch_zip(tmp_path / "evil.pt", _dotted_os_system(tmp_path, marker))
    cli("inspect", str(evil), "--trust-pickle", cwd=tmp_path)
    assert marker.exists(), "--trust-pickle loads with the full unpickler, as documented"


# torch.export programs ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pt2") / "prog.pt2"
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    batch = torch.export.Dim("batch", min=2)
    exported = torch.export.export(model, (torch.randn(3, 4),), dynamic_shapes=({0: batch},))
    torch.export.save(exported, path)
    return path


def _rewrite_zip(src: Path, dst: Path, change: Callable[[str, bytes], bytes]) -> Path:
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w") as new:
        for info in old.infolist():
            new.writestr(info, change(info.filename, old.read(info)))
    return dst


def test_pt2_sample_inputs_payload_never_runs(program: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = torch_zip(tmp_path / "payload.pt", _dotted_os_system(tmp_path, marker))

    def change(name: str, data: bytes) -> bytes:
        return payload.read_bytes() if name.endswith("sample_inputs/model.pt") else data

    evil = _rewrite_zip(program, tmp_path / "evil.pt2", change)
    unsafe_load_runs_it(evil, marker, tmp_path, "torch.export.load")
    assert_refused(cli("export", str(evil), "o.onnx", cwd=tmp_path), marker, "--trust-pickle")


def test_pt2_shape_expression_payload_never_runs(program: Path, tmp_path: Path) -> None:
    """torch.export.load hands symbolic-shape strings to sympy.sympify, which evaluates them:
    no weights-only unpickler can make a .pt2 safe, so serfswap refuses them untrusted."""
    marker = tmp_path / "pwned"

    def change(name: str, data: bytes) -> bytes:
        if not name.endswith("models/model.json"):
            return data
        text = data.decode()
        graph = json.loads(text)["graph_module"]["graph"]
        batch = graph["tensor_values"][graph["inputs"][-1]["as_tensor"]["name"]]["sizes"][0]
        expression = batch["as_expr"]["expr_str"]  # "Symbol('s31', positive=True, ...)"
        evil = f"__import__('pathlib').Path({str(marker)!r}).touch() or {expression}"
        return text.replace(json.dumps(expression), json.dumps(evil)).encode()

    evil = _rewrite_zip(program, tmp_path / "shape.pt2", change)
    unsafe_load_runs_it(evil, marker, tmp_path, "torch.export.load")
    assert_refused(cli("inspect", str(evil), cwd=tmp_path), marker, "--trust-pickle")


# HuggingFace folders ------------------------------------------------------------------------------


def _remote_code_folder(folder: Path, marker: Path, model_type: str) -> Path:
    """A model folder whose config points (auto_map) at code shipped beside it; for a known
    ``model_type`` with real weights of that type beside them."""
    if model_type == "bert":
        cfg = tiny_bert_config()
        transformers.BertModel(cfg).save_pretrained(folder)
    else:
        folder.mkdir()
    code = f"""
        {touch(marker)}
        from transformers import PretrainedConfig, PreTrainedModel
        import torch

        class EvilConfig(PretrainedConfig):
            model_type = {model_type!r}

        class EvilModel(PreTrainedModel):
            config_class = EvilConfig
            def __init__(self, config):
                super().__init__(config)
                self.act = torch.nn.ReLU()
    """
    (folder / "evil_code.py").write_text(textwrap.dedent(code))
    config = {
        "model_type": model_type,
        "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "evil_code.EvilConfig", "AutoModel": "evil_code.EvilModel"},
        "vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 37,
    }  # fmt: skip
    if model_type == "bert":
        config = {**json.loads((folder / "config.json").read_text()), **config}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_hf_folder_code_never_runs_even_with_yes_on_stdin(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = _remote_code_folder(tmp_path / "model", marker, "evil-net")
    unsafe_load_runs_it(
        folder, marker, tmp_path,
        "lambda p: __import__('transformers').AutoModel.from_pretrained(p, trust_remote_code=True)",
    )  # fmt: skip
    assert_refused(cli("inspect", str(folder), cwd=tmp_path), marker, "--trust-remote-code")
    assert_refused(
        cli("export", "x.safetensors", "o.onnx", "--arch", f"hf:{folder}", cwd=tmp_path),
        marker,
        "x.safetensors",  # no such file: refused before the folder is read
    )


def test_known_model_type_with_auto_map_uses_transformers_own_class(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = _remote_code_folder(tmp_path / "model", marker, "bert")
    result = cli("inspect", str(folder), cwd=tmp_path)
    assert not marker.exists(), "the folder's code ran"
    assert result.returncode == 0 and "BertModel" in result.stdout, result.stderr


def test_tokenizer_folder_code_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    cfg = tiny_bert_config()
    transformers.BertModel(cfg).save_pretrained(tmp_path / "model")
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "evil_tok.py").write_text(
        touch(marker) + "\nfrom transformers import PreTrainedTokenizer\n"
        "class EvilTokenizer(PreTrainedTokenizer):\n    pass\n"
    )
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "EvilTokenizer",
        "auto_map": {"AutoTokenizer": ["evil_tok.EvilTokenizer", None]},
    }))  # fmt: skip
    (tokenizer / "config.json").write_text(json.dumps({"model_type": "evil-tok"}))
    unsafe_load_runs_it(
        tokenizer, marker, tmp_path,
        "lambda p: __import__('transformers').AutoTokenizer.from_pretrained("
        "p, trust_remote_code=True)",
    )  # fmt: skip
    (tmp_path / "data.txt").write_text("\n".join(f"line {i}" for i in range(8)))
    result = cli(
        "recover", str(tmp_path / "model"), "--data", str(tmp_path / "data.txt"),
        "--tokenizer", str(tokenizer), "--steps", "1", "-o", str(tmp_path / "o.safetensors"),
        cwd=tmp_path,
    )  # fmt: skip
    assert_refused(result, marker, "--trust-remote-code", after=True)  # after the model loaded
    assert not (tmp_path / "o.safetensors").exists()


def test_checkpoint_metadata_cannot_name_remote_code(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    marker = tmp_path / "pwned"
    folder = _remote_code_folder(tmp_path / "model", marker, "evil-net")
    config = {**json.loads((folder / "config.json").read_text()), "_name_or_path": str(folder)}
    metadata = {
        "format": "serfswap-checkpoint/1",
        "arch": json.dumps({"kind": "hf", "config": config}),
        "swap": json.dumps({"activations": ["relu"], "sites": ["act"]}),
    }
    save_file({"w": torch.zeros(1)}, str(tmp_path / "c.safetensors"), metadata=metadata)
    result = cli("inspect", str(tmp_path / "c.safetensors"), cwd=tmp_path)
    assert_refused(result, marker, "auto_map")
