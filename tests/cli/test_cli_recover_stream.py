"""`serfswap recover --data` on text to stream (stream.py): a Parquet file through the CLI,
its column named with --text-field, a held-out count; a malformed JSON-lines file and a missing
pyarrow refused with one clear line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.support.cli import run
from tests.support.data import TEXT

pa = pytest.importorskip("pyarrow", reason="pyarrow is in the [data] extra")
pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is in the [data] extra")
pytest.importorskip("transformers", reason="transformers is in the [hf] extra")


def test_recover_a_parquet_file_by_its_column(text_model: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": list(range(12)), "body": TEXT.splitlines()}), data,
                   row_group_size=4)  # fmt: skip
    out = tmp_path / "bert.safetensors"
    code, stdout, err = run(capsys, "recover", str(text_model), "--data", str(data),
                            "--text-field", "body", "--held-out", "4", "--steps", "3",
                            "--batch-size", "4", "--lr", "1e-3", "-o", str(out))  # fmt: skip
    assert code == 0, err
    assert "text streamed from 1 parquet file(s)" in stdout and "field 'body'" in stdout
    assert "4 first examples of the stream held out" in stdout
    assert "evaluating the converted model on 1 held-out batch" in stdout
    assert out.is_file()


def test_recover_refuses_bad_text_to_stream(
    text_model: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = tmp_path / "corpus.jsonl"
    lines.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT.splitlines()[:3])
                     + "{not json\n")  # fmt: skip
    out = str(tmp_path / "o.safetensors")
    common = ["--steps", "1", "--held-out", "1", "-o", out]
    code, _, err = run(capsys, "recover", str(text_model), "--data", str(lines), *common)
    assert code == 2 and f"{lines}:4: not JSON" in err and err.count("error:") == 1, err
    code, _, err = run(capsys, "recover", str(text_model), "--data", str(lines), "--text-field",
                       "body", *common)  # fmt: skip
    assert code == 2 and f"{lines}:1: no field 'body'" in err, err
    code, _, err = run(capsys, "recover", str(text_model), "--data", str(lines),
                       "--held-out", "2.5", "--steps", "1", "-o", out)  # fmt: skip
    assert code == 2 and "--held-out a share between 0 and 1 or a count" in err, err

    parquet = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": ["a", "b"]}), parquet)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as where pyarrow is not installed
    code, _, err = run(capsys, "recover", str(text_model), "--data", str(parquet), *common)
    assert code == 2 and "needs pyarrow (pip install 'serfswap[data]')" in err, err
    assert not Path(out).exists()
