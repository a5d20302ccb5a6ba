"""Streaming text (serfswap/recovery/stream.py): JSON lines, Parquet, Arrow and real `datasets`
folders, read lazily, tokenised on the fly, positioned and sought exactly; recovery through it,
resumed bit-exactly from a checkpoint by seeking."""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import serfswap
from serfswap.recovery import state as trainstate
from serfswap.recovery import stream
from serfswap.recovery.data import load_tokenizer, tokenize
from tests.support.data import TEXT
from tests.support.models import tiny_bert_config

pa = pytest.importorskip("pyarrow", reason="pyarrow is in the [data] extra")
pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is in the [data] extra")
transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")

LINES = TEXT.splitlines()  # 12 sentences
MAX = 16


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real WordPiece tokenizer over the words of TEXT, saved as a folder (no download)."""
    root = tmp_path_factory.mktemp("tok")
    words = sorted({w.strip(".,").lower() for w in TEXT.split()})
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                               *words]) + "\n")  # fmt: skip
    transformers.BertTokenizerFast(str(root / "vocab.txt")).save_pretrained(root)
    return root


def write(kind: str, folder: Path, lines: list[str], **extra: list) -> Path:
    """``lines`` as a file of ``kind`` (with more columns ``extra``), in small pieces: Parquet
    row groups and Arrow record batches of 3 rows, so that seeking skips some."""
    table = pa.table({"text": lines, **extra})
    path = folder / f"corpus.{kind.split('-')[0]}"
    if kind == "jsonl":
        rows = table.to_pylist()
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    elif kind == "parquet":
        pq.write_table(table, path, row_group_size=3)
    else:  # "arrow-file" (IPC file format) or "arrow-stream" (as datasets writes)
        writer = pa.ipc.new_file if kind == "arrow-file" else pa.ipc.new_stream
        with pa.OSFile(str(path), "wb") as sink, writer(sink, table.schema) as out:
            for batch in table.to_batches(max_chunksize=3):
                out.write_batch(batch)
    return path


def everything(data: stream.TextStream, n: int) -> list[dict[str, torch.Tensor]]:
    """The next ``n`` batches, pass after pass, as recover() draws them (an iteration is a
    pass)."""
    out: list[dict[str, torch.Tensor]] = []
    while len(out) < n:
        out.extend(batch for _, batch in zip(range(n - len(out)), data, strict=False))
    return out


def same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


KINDS = ["jsonl", "parquet", "arrow-file", "arrow-stream"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_stream_holds_out_its_first_examples_and_batches_the_rest_in_order(
    tmp_path: Path, tokenizer_dir: Path, kind: str
) -> None:
    path = write(kind, tmp_path, [LINES[0], "", *LINES[1:]], n=list(range(13)))  # a blank row
    data = stream.texts(path, tokenizer_dir, batch_size=4, held_out=2, max_length=MAX)
    tok = load_tokenizer(tokenizer_dir)
    assert len(data.held_out) == 1
    same(data.held_out, [tokenize(tok, LINES[:2], MAX)])
    rest = LINES[2:]  # 10 examples: batches of 4, 4, 2, then the next pass
    expected = [tokenize(tok, rest[k : k + 4], MAX) for k in (0, 4, 8)]
    same(everything(data.train, 3), expected)
    assert "2 first examples of the stream held out" in data.description


@pytest.mark.parametrize("kind", KINDS)
def test_position_and_seek_resume_the_stream_exactly(
    tmp_path: Path, tokenizer_dir: Path, kind: str
) -> None:
    path = write(kind, tmp_path, LINES)
    tok = load_tokenizer(tokenizer_dir)

    def fresh() -> stream.TextStream:
        data = stream.TextStream([path], tok, batch_size=5, max_length=MAX)
        data.hold_out(1)
        return data

    straight = everything(fresh(), 9)  # 11 examples: 5, 5, 1 a pass; three passes
    for drawn in range(1, 9):
        first = fresh()
        everything(first, drawn)
        position = first.data_position()
        assert position["pass"] == (drawn - 1) // 3  # a pass ends when the next is drawn
        resumed = fresh()
        resumed.seek(json.loads(json.dumps(position)))  # plain data, as a checkpoint holds it
        same(everything(resumed, 9 - drawn), straight[drawn:])


def test_seeking_a_json_lines_file_reads_nothing_before_the_position(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    """The byte offset is sought: lines before it are never read again (here they are spoilt
    after the position was taken, and the stream still goes on from it)."""
    path = write("jsonl", tmp_path, LINES)
    tok = load_tokenizer(tokenizer_dir)
    data = stream.TextStream([path], tok, batch_size=4, max_length=MAX)
    it = iter(data)
    next(it), next(it)
    position = data.data_position()
    assert position["row"] == 8 and position["offset"] > 0
    raw = path.read_bytes()
    path.write_bytes(b"x" * position["offset"] + raw[position["offset"] :])
    resumed = stream.TextStream([path], tok, batch_size=4, max_length=MAX)
    resumed.seek(position)
    same([next(iter(resumed))], [tokenize(tok, LINES[8:12], MAX)])
    with pytest.raises(serfswap.InvalidArgumentError, match=r"corpus\.jsonl:1: not JSON"):
        next(iter(stream.TextStream([path], tok, batch_size=4, max_length=MAX)))


def test_a_parquet_stream_reads_lazily(tmp_path: Path, tokenizer_dir: Path) -> None:
    """The whole corpus is never in memory: while a 6 MB Parquet file is read, Arrow holds a
    small part of it (about two row groups of the text column; pyarrow counts all it
    allocates)."""
    import random

    rng = random.Random(0)
    lines = [" ".join(rng.choice(LINES).split()[:4]) + f" {rng.getrandbits(2000):x}"
             for _ in range(12000)]  # fmt: skip
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": lines}), path, row_group_size=500, compression="none")
    size = path.stat().st_size
    assert size > 5e6
    data = stream.TextStream([path], load_tokenizer(tokenizer_dir), batch_size=8, max_length=8)
    base = pa.total_allocated_bytes()
    reading = iter(data)  # held: what it has read stays allocated
    for _ in range(100):  # 800 rows, into the second row group
        batch = next(reading)
    held = pa.total_allocated_bytes() - base
    assert batch["input_ids"].shape[0] == 8
    assert data.data_position()["row"] == 800
    assert held < size / 5, (held, size)  # measured: 0.85 MB of 6.4
    whole = pq.read_table(path)
    assert pa.total_allocated_bytes() - base > size / 2  # the measure sees a whole read
    del whole, reading


def test_a_datasets_folder_and_a_dataset_dict(tmp_path: Path, tokenizer_dir: Path) -> None:
    datasets = pytest.importorskip("datasets", reason="datasets is in the [dev] extra")
    tok = load_tokenizer(tokenizer_dir)
    one = datasets.Dataset.from_dict({"text": LINES, "n": list(range(12))})
    one.save_to_disk(str(tmp_path / "one"), num_shards=2)  # two Arrow files, read in order
    data = stream.texts(tmp_path / "one", tokenizer_dir, batch_size=5, held_out=2,
                        max_length=MAX)  # fmt: skip
    assert stream.is_stream(tmp_path / "one") and len(data.train.files) == 2
    same(data.held_out, [tokenize(tok, LINES[:2], MAX)])
    same(everything(data.train, 2), [tokenize(tok, LINES[k : k + 5], MAX) for k in (2, 7)])

    split = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": LINES[:8]}),
        "validation": datasets.Dataset.from_dict({"text": LINES[8:]}),
    })  # fmt: skip
    split.save_to_disk(str(tmp_path / "split"))
    data = stream.texts(tmp_path / "split", tokenizer_dir, batch_size=4, held_out=3,
                        max_length=MAX)  # fmt: skip
    same(data.held_out, [tokenize(tok, LINES[8:11], MAX)])  # from the validation split
    same(everything(data.train, 3), [tokenize(tok, LINES[k : k + 4], MAX) for k in (0, 4, 0)])
    assert "held-out split" in data.description


def test_a_stream_with_nothing_left_to_train_on_is_refused(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    path = write("jsonl", tmp_path, LINES)  # 12 examples; a share holds out the first 256
    with pytest.raises(serfswap.InvalidArgumentError, match="none is left to train on"):
        stream.texts(path, tokenizer_dir, batch_size=4, held_out=0.1, max_length=MAX)


@pytest.mark.parametrize(
    ("content", "field", "error"),
    [
        ('{"text": "a"}\n{"text": "b"\n', "text", r"bad\.jsonl:2: not JSON"),
        ('{"text": "a"}\n\n[1, 2]\n', "text", r"bad\.jsonl:3: a JSON list, not an object"),
        ('{"body": "a"}\n', "text", r"bad\.jsonl:1: no field 'text' \(it has \['body'\]\)"),
        ('{"text": 3}\n', "text", r"bad\.jsonl: row 1: 'text' holds int, not text"),
        ('{"text": "a"}\n', "", r"--text-field"),
    ],
)
def test_malformed_json_lines_name_the_file_and_line(
    tmp_path: Path, tokenizer_dir: Path, content: str, field: str, error: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    data = stream.TextStream([path], load_tokenizer(tokenizer_dir), 4, MAX, text_field=field)
    with pytest.raises(serfswap.InvalidArgumentError, match=error):
        list(data)


def test_malformed_parquet_and_arrow_files_are_refused_clearly(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    tok = load_tokenizer(tokenizer_dir)
    path = write("parquet", tmp_path, LINES)
    with pytest.raises(serfswap.InvalidArgumentError, match=r"no column 'body'.*--text-field"):
        list(stream.TextStream([path], tok, 4, MAX, text_field="body"))
    for name in ("junk.parquet", "junk.arrow"):
        (tmp_path / name).write_bytes(b"not columnar data at all" * 10)
        with pytest.raises(serfswap.InvalidArgumentError, match=r"not an? (Parquet|Arrow) file"):
            list(stream.TextStream([tmp_path / name], tok, 4, MAX))
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "state.json").write_text('{"_data_files": [{"filename": "../x.arrow"}]}')
    with pytest.raises(serfswap.InvalidArgumentError, match="not an Arrow file of the folder"):
        stream.texts(tmp_path / "ds", tokenizer_dir, 4, 1, MAX)
    with pytest.raises(serfswap.InvalidArgumentError, match="outside this stream"):
        stream.TextStream([path], tok, 4, MAX).seek({"pass": 0, "file": 3, "row": 0,
                                                     "offset": 0, "token": 0})  # fmt: skip
    with pytest.raises(serfswap.InvalidArgumentError, match="not a stream position"):
        stream.TextStream([path], tok, 4, MAX).seek({"pass": 0})


@pytest.fixture(scope="module")
def bert() -> tuple[torch.nn.Module, torch.nn.Module]:
    """A tiny BERT (the teacher) and its conversion, which each run copies."""
    config = tiny_bert_config(vocab_size=128, num_hidden_layers=2, intermediate_size=64,
                              max_position_embeddings=64, initializer_range=0.3)  # fmt: skip
    torch.manual_seed(0)
    teacher = transformers.BertModel(config).eval()
    return teacher, serfswap.convert(teacher)


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_recovery_from_a_stream_resumes_bit_exactly_by_seeking(
    tmp_path: Path, tokenizer_dir: Path, kind: str, bert: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A run stopped after its checkpoint of step 4 (what a kill leaves: the later checkpoints
    removed) and resumed on a fresh stream seeks there and ends with the uninterrupted weights;
    the steps cross the end of a pass (10 examples, batches of 4, 4, 2)."""
    path = write(kind, tmp_path, LINES)

    def data() -> Any:  # as each new process builds it
        return stream.texts(path, tokenizer_dir, batch_size=4, held_out=2, max_length=MAX)

    # No fit: the positions below count the steps' batches only (the fit would draw 4 first).
    options = {"steps": 5, "lr": 1e-3, "fit_batches": 0, "progress": False}
    teacher, converted = bert
    straight = copy.deepcopy(converted)
    first = data()
    serfswap.recover(straight, teacher, first.train, **options)
    assert first.train.data_position()["pass"] == 1  # 5 batches: 3 a pass

    killed = copy.deepcopy(converted)
    folder = tmp_path / "ckpt"
    serfswap.recover(killed, teacher, data().train, checkpoint_dir=folder, checkpoint_every=4,
                     keep=5, **options)  # fmt: skip
    position = trainstate._read(folder / "step-00000004").data_position
    # Step 4 drew the first batch of the second pass: the rows 2 to 5 (two are held out).
    offset = len(b"".join(path.read_bytes().splitlines(keepends=True)[:6]))
    assert position == {
        "pass": 1,
        "file": 0,
        "row": 6,
        "offset": offset if kind == "jsonl" else 0,
        "token": 0,
    }
    shutil.rmtree(folder / "step-00000005")
    resumed = copy.deepcopy(converted)
    with caplog.at_level(logging.INFO, logger="serfswap"):
        result = serfswap.recover(resumed, teacher, data().train, checkpoint_dir=folder,
                                  resume=True, **options)  # fmt: skip
    assert result.resumed_from == 4
    assert "seeking the data past the 4 batches" in caplog.text
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(),
                            strict=True):  # fmt: skip
        assert torch.equal(a, b), name


def test_a_checkpoint_without_a_data_position_still_loads(tmp_path: Path) -> None:
    """Checkpoints written before the position was stored: read with None (replayed)."""
    state = trainstate.RunState(10, step=3).to_dict()
    del state["data_position"]
    assert trainstate.RunState.from_dict(state, tmp_path).data_position is None


def test_packing_fills_rows_exactly_and_seeks_mid_example(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    """pack=True: the examples' tokens, each followed by EOS, end to end in rows of exactly
    max_length tokens (no padding); a position inside an example resumes exactly."""
    path = write("parquet", tmp_path, LINES)
    tok = transformers.BertTokenizerFast.from_pretrained(tokenizer_dir, eos_token="[SEP]")
    every = [t for line in LINES for t in tok(line, add_special_tokens=False)["input_ids"]
             + [tok.eos_token_id]]  # fmt: skip
    rows, length = 2, 7  # 14 tokens a batch: most batches begin inside an example

    def fresh() -> stream.TextStream:
        return stream.TextStream([path], tok, rows, length, pack=True)

    n = len(every) // (rows * length)  # batches a pass; the rest of the tokens are left
    straight = everything(fresh(), 2 * n)
    for batch in straight:
        assert batch["input_ids"].shape == (rows, length)
        assert bool(batch["attention_mask"].all())
    first_pass = torch.cat([b["input_ids"].flatten() for b in straight[:n]]).tolist()
    assert first_pass == every[: n * rows * length]
    same(straight[n:], straight[:n])  # the second pass begins again at the first example
    inside = 0
    for drawn in range(1, 2 * n):
        first = fresh()
        everything(first, drawn)
        position = first.data_position()
        inside += position["token"] > 0
        resumed = fresh()
        resumed.seek(position)
        same(everything(resumed, 2 * n - drawn), straight[drawn:])
    assert inside >= n  # the seeks were tested inside examples
    with pytest.raises(serfswap.InvalidArgumentError, match="EOS token"):
        stream.TextStream([path], load_tokenizer(tokenizer_dir), rows, length, pack=True)
