"""Streaming text for recovery at LLM scale: JSON lines, Parquet, Arrow and ``datasets`` folders,
read a batch at a time and tokenised on the fly, never whole in memory.

A corpus too large for memory cannot be split with a shuffle as ``data.texts`` splits a text
file, so a stream is read in its files' order: the first examples are held out (or a
``datasets`` folder's validation/test split is), the rest are the training examples, pass after
pass. Its *position* (the pass, the file, the row in it, and for JSON lines the byte offset)
says where the next batch starts; a checkpoint stores it, and a resumed run seeks there instead
of reading and tokenising again every batch the killed run had drawn: a Parquet file skips
whole row groups by their metadata, an Arrow file whole record batches, a JSON-lines file
seeks to the byte offset.

Only JSON and Arrow data are read (``pyarrow``, the ``[data]`` extra; JSON lines need nothing):
a ``datasets`` folder holds ``state.json`` and Arrow files, and nothing in it is executed.
Under ``torchrun`` every rank reads the same stream and cuts its slice of each global batch.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..errors import InvalidArgumentError, install_hint

if TYPE_CHECKING:  # torch is imported when a stream is made, not by the CLI's checks
    import torch

    from .data import RecoveryData

KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}
# A stream's length is unknown until it is read: a share of it cannot be held out. A held_out
# below 1 (a share, as for a text file) holds out this many of its first examples instead.
DEFAULT_HELD_OUT = 256
_DATASET = "state.json"  # Dataset.save_to_disk
_DATASET_DICT = "dataset_dict.json"  # DatasetDict.save_to_disk
_HELD_OUT_SPLITS = ("validation", "test")
_READ_ROWS = 1024  # rows pyarrow decodes at a time from a Parquet file
_READ_BYTES = 1 << 16  # and the bytes it reads from the file at a time
# A position (see data_position); "token": how many tokens of the example at the position a
# packed stream has handed out already (0 unpacked).
_START = {"pass": 0, "file": 0, "row": 0, "offset": 0, "token": 0}


@runtime_checkable
class Seekable(Protocol):
    """Data that can say where it stands and go back there: a checkpoint stores the position,
    and a resumed run seeks to it instead of drawing again the batches drawn before."""

    def data_position(self) -> dict[str, int]: ...

    def seek(self, position: dict[str, int]) -> None: ...


def is_stream(source: Path) -> bool:
    """Whether ``--data`` is read by this module: a file of a known kind, a ``datasets``
    folder, or a folder of such files (an image folder, or a text file, is not)."""
    if source.is_dir():
        return _is_dataset(source) or bool(_folder_files(source))
    return source.suffix.lower() in KINDS


def needs_pyarrow(source: Path) -> bool:
    """Whether reading ``source`` takes pyarrow (all but JSON lines)."""
    if source.is_dir():
        return _is_dataset(source) or any(KINDS[f.suffix.lower()] != "jsonl"
                                          for f in _folder_files(source))  # fmt: skip
    return KINDS.get(source.suffix.lower(), "jsonl") != "jsonl"


def texts(source: Path, tokenizer_dir: Path, batch_size: int, held_out: float,
          max_length: int, *, text_field: str = "text", pack: bool = False,
          trust_remote_code: bool = False) -> RecoveryData:  # fmt: skip
    """``source`` as training and held-out batches: a :class:`TextStream` over its training
    examples, and the held-out examples tokenised (the first ``held_out`` of the stream when it
    is a count from 1 up, :data:`DEFAULT_HELD_OUT` when it is a share, or of a ``datasets``
    folder's validation/test split). ``pack``: training rows of exactly ``max_length`` tokens,
    the examples end to end (causal LMs; see :meth:`TextStream._packed`); the held-out
    examples stay whole, padded."""
    from .data import RecoveryData, held_out_batch, load_tokenizer, tokenize

    train_files, held_files = _files(source)
    tokenizer = load_tokenizer(tokenizer_dir, trust_remote_code=trust_remote_code)
    count = int(held_out) if held_out >= 1 else DEFAULT_HELD_OUT
    stream = TextStream(train_files, tokenizer, batch_size, max_length, text_field=text_field,
                        pack=pack)  # fmt: skip
    if held_files is not None:
        held = [text for text, _ in _take(_examples(held_files, text_field, _START), count)]
        if not held:
            raise InvalidArgumentError(f"{source}: the held-out split has no text")
        where = "of its held-out split"
    else:
        held = stream.hold_out(count)
        where = "of the stream"
    size = held_out_batch(batch_size)
    batches = [tokenize(tokenizer, held[k : k + size], max_length)
               for k in range(0, len(held), size)]  # fmt: skip
    kinds = "/".join(sorted({KINDS[f.suffix.lower()] for f in train_files}))
    return RecoveryData(
        stream, batches,
        f"text streamed from {len(train_files)} {kinds} file(s) in {source}, field "
        f"{text_field!r}{', packed' if pack else ''} ({len(held)} first examples {where} held "
        "out)",
    )  # fmt: skip


class TextStream:
    """The training examples of a list of files, tokenised ``batch_size`` at a time into padded
    dict batches as ``data.texts`` makes them. Each iteration is one pass from where the stream
    stands to the end of its files (iterating advances it, as a generator does); the next one
    starts the next pass. :meth:`data_position` and :meth:`seek` make it :class:`Seekable`."""

    def __init__(self, files: list[Path], tokenizer: Any, batch_size: int, max_length: int, *,
                 text_field: str = "text", pack: bool = False) -> None:  # fmt: skip
        if not files:
            raise InvalidArgumentError("a text stream needs at least one file")
        if pack and getattr(tokenizer, "eos_token_id", None) is None:
            raise InvalidArgumentError(
                "packing separates the examples with the tokenizer's EOS token, and this "
                "tokenizer has none"
            )
        self.pack = pack
        self.files, self.tokenizer, self.text_field = list(files), tokenizer, text_field
        self.batch_size, self.max_length = batch_size, max_length
        self._start = dict(_START)  # where each pass begins: after the held-out examples
        self._position = dict(_START)

    def hold_out(self, count: int) -> list[str]:
        """The first ``count`` examples, taken out of training: every pass starts after them.
        Refused when nothing would be left to train on."""
        rest = _examples(self.files, self.text_field, _START)
        pairs = list(_take(rest, count))
        left = next(rest, None)
        rest.close()  # its file
        taken = [text for text, _ in pairs]
        if left is None:
            raise InvalidArgumentError(
                f"{self.files[0]}: {len(taken)} examples in all, and the first {count} are held "
                "out: none is left to train on (--held-out N holds out the first N)"
            )
        self._start = dict(pairs[-1][1]) if pairs else dict(_START)
        self._position = dict(self._start)
        return taken

    def data_position(self) -> dict[str, int]:
        """Where the next batch starts: the pass, the file's index, the row in it, the byte
        offset of that row (JSON lines; 0 for the others), and, packed, the tokens of that
        row's example handed out already. Plain ints: a checkpoint holds it."""
        return dict(self._position)

    def seek(self, position: dict[str, int]) -> None:
        """Go to ``position`` (from :meth:`data_position`): the next batch is the one that came
        after it, read without reading what came before."""
        try:
            pos = {key: int(position[key]) for key in _START}
        except (KeyError, TypeError, ValueError):
            raise InvalidArgumentError(f"not a stream position: {position!r:.200}") from None
        if not 0 <= pos["file"] < len(self.files) or min(pos.values()) < 0:
            raise InvalidArgumentError(
                f"position {pos} is outside this stream of {len(self.files)} file(s): was the "
                "checkpoint written with other --data?"
            )
        self._position = pos

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            began = self._position
            fresh = began == {**self._start, "pass": began["pass"]}
            drawn = False
            for batch in self._packed() if self.pack else self._batches():
                drawn = True
                yield batch
            self._position = {**self._start, "pass": began["pass"] + 1}
            if drawn or fresh:  # a pass that began at its end (a resume there) goes on
                return

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches from the position to the end of the pass; the position moves past each
        batch as it is handed out (not before: a checkpoint between two is exact)."""
        from .data import tokenize

        pending: list[str] = []
        after = self._position
        for text, after in _examples(self.files, self.text_field, self._position):
            pending.append(text)
            if len(pending) == self.batch_size:
                batch = tokenize(self.tokenizer, pending, self.max_length)
                self._position, pending = after, []
                yield batch
        if pending:
            batch = tokenize(self.tokenizer, pending, self.max_length)
            self._position = after
            yield batch

    def _packed(self) -> Iterator[dict[str, torch.Tensor]]:
        """Rows of exactly ``max_length`` tokens: the examples' tokens, each followed by EOS,
        end to end (an example may run on into the next row, or batch); no padding. The
        position is the example the next batch begins in, and how many of its tokens were
        handed out before. The tokens at the end of a pass that do not fill a batch are left."""
        import torch

        rows, need = self.batch_size, self.batch_size * self.max_length
        eos = [self.tokenizer.eos_token_id]
        # The examples whose tokens are not all handed out: (position before, tokens handed
        # out already, the tokens left), oldest first.
        queue: deque[tuple[dict[str, int], int, list[int]]] = deque()
        before, skip = {**self._position, "token": 0}, self._position["token"]
        available = 0
        for text, after in _examples(self.files, self.text_field, before):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + eos
            queue.append((before, skip, ids[skip:]))
            available += len(ids) - skip
            before, skip = after, 0
            while available >= need:
                flat: list[int] = []
                while len(flat) < need:
                    where, done, left = queue.popleft()
                    take = min(need - len(flat), len(left))
                    flat.extend(left[:take])
                    if take < len(left):
                        queue.appendleft((where, done + take, left[take:]))
                available -= need
                self._position = ({**queue[0][0], "token": queue[0][1]} if queue
                                  else dict(before))  # fmt: skip
                packed = torch.tensor(flat).view(rows, self.max_length)
                yield {"input_ids": packed, "attention_mask": torch.ones_like(packed)}


def _take(examples: Iterator[Any], n: int) -> Iterator[Any]:
    for _, item in zip(range(n), examples, strict=False):
        yield item


def _examples(files: list[Path], field: str, start: dict[str, int]
              ) -> Iterator[tuple[str, dict[str, int]]]:  # fmt: skip
    """The texts from ``start`` to the end of ``files``, each with the position after it.
    Missing and blank texts are skipped (as blank lines of a text file are)."""
    for index in range(start["file"], len(files)):
        path = files[index]
        row, offset = (start["row"], start["offset"]) if index == start["file"] else (0, 0)
        for value, at, byte in _rows(path, field, row, offset):
            if value is None or (isinstance(value, str) and not value.strip()):
                continue
            if not isinstance(value, str):
                raise InvalidArgumentError(
                    f"{path}: row {at}: {field!r} holds {type(value).__name__}, not text "
                    "(--text-field names the field that holds the text)"
                )
            yield value, {"pass": start["pass"], "file": index, "row": at, "offset": byte,
                          "token": 0}  # fmt: skip


def _rows(path: Path, field: str, row: int, offset: int) -> Iterator[tuple[Any, int, int]]:
    """The values of ``field`` in ``path`` from ``row`` (at byte ``offset``, JSON lines), each
    with the row and byte offset after it."""
    kind = KINDS.get(path.suffix.lower())
    if kind == "jsonl":
        return _jsonl_rows(path, field, row, offset)
    if kind == "parquet":
        return _parquet_rows(path, field, row)
    return _arrow_rows(path, field, row)


def _jsonl_rows(path: Path, field: str, row: int, offset: int
                ) -> Iterator[tuple[Any, int, int]]:  # fmt: skip
    """One JSON object per line; ``row`` is the line, ``offset`` its first byte."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        for raw in iter(handle.readline, b""):
            row, offset = row + 1, offset + len(raw)
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except UnicodeDecodeError:
                raise InvalidArgumentError(f"{path}:{row}: not UTF-8 text") from None
            except json.JSONDecodeError as exc:
                raise InvalidArgumentError(
                    f"{path}:{row}: not JSON ({exc.msg}); JSON lines hold one object a line"
                ) from None
            if not isinstance(record, dict):
                raise InvalidArgumentError(
                    f"{path}:{row}: a JSON {type(record).__name__}, not an object; JSON lines "
                    "hold one object a line"
                )
            if field not in record:
                raise InvalidArgumentError(
                    f"{path}:{row}: no field {field!r} (it has {sorted(record)[:8]}); "
                    "--text-field names the field that holds the text"
                )
            yield record[field], row, offset


def _parquet_rows(path: Path, field: str, row: int) -> Iterator[tuple[Any, int, int]]:
    """The text column only; the row groups before ``row`` are skipped by their metadata."""
    _, parquet = _pyarrow(path)
    try:
        # Page by page, in this thread: pyarrow's defaults (pre-buffering, threads reading
        # ahead) hold a whole column chunk, or several row groups, in memory.
        handle = parquet.ParquetFile(str(path), pre_buffer=False, buffer_size=_READ_BYTES)
    except Exception as exc:  # pyarrow's ArrowInvalid, OSError
        raise InvalidArgumentError(f"{path}: not a Parquet file ({exc})") from None
    with handle:
        _check_field(path, field, handle.schema_arrow.names)
        meta, group, first = handle.metadata, 0, 0
        while group < meta.num_row_groups and first + meta.row_group(group).num_rows <= row:
            first += meta.row_group(group).num_rows
            group += 1
        if group == meta.num_row_groups:
            return
        groups = list(range(group, meta.num_row_groups))
        batches = handle.iter_batches(_READ_ROWS, row_groups=groups, columns=[field],
                                      use_threads=False)  # fmt: skip
        for batch in batches:
            values = batch.column(0).to_pylist()
            for k in range(max(0, row - first), len(values)):
                yield values[k], first + k + 1, 0
            first += len(values)


def _arrow_rows(path: Path, field: str, row: int) -> Iterator[tuple[Any, int, int]]:
    """Arrow IPC, the file format or the stream format (which ``datasets`` writes), memory
    mapped; the record batches before ``row`` are skipped whole."""
    pa, _ = _pyarrow(path)
    source = pa.memory_map(str(path))
    try:
        try:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_stream(source)
            batches = iter(reader)
    except pa.ArrowInvalid as exc:
        source.close()
        raise InvalidArgumentError(f"{path}: not an Arrow file ({exc})") from None
    with source:
        _check_field(path, field, reader.schema.names)
        first = 0
        for batch in batches:
            n = batch.num_rows
            if first + n > row:
                values = batch.column(field).to_pylist()
                for k in range(max(0, row - first), n):
                    yield values[k], first + k + 1, 0
            first += n


def _check_field(path: Path, field: str, names: list[str]) -> None:
    if field not in names:
        raise InvalidArgumentError(
            f"{path}: no column {field!r} (it has {names[:8]}); --text-field names the column "
            "that holds the text"
        )


def require_pyarrow(path: Path) -> None:
    """A clear error, with the install hint, when reading ``path`` needs pyarrow and it is not
    installed (the CLI checks --data before loading the model)."""
    _pyarrow(path)


def _pyarrow(path: Path) -> tuple[Any, Any]:
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        hint = install_hint("data")
        raise InvalidArgumentError(f"reading {path} needs pyarrow ({hint})") from None
    return pyarrow, pyarrow.parquet


@dataclass(frozen=True)
class _Split:
    train: list[Path]
    held_out: list[Path] | None


def _files(source: Path) -> tuple[list[Path], list[Path] | None]:
    """The training files of ``source`` and those of its held-out split (None: the first
    examples of the training files are held out)."""
    if not source.is_dir():
        return [source], None
    if (source / _DATASET_DICT).is_file():
        split = _dataset_dict(source)
        return split.train, split.held_out
    if (source / _DATASET).is_file():
        return _dataset_files(source), None
    found = _folder_files(source)
    if not found:
        raise InvalidArgumentError(
            f"{source}: no .jsonl, .parquet or .arrow file, and not a datasets folder"
        )
    return found, None


def _is_dataset(folder: Path) -> bool:
    return (folder / _DATASET).is_file() or (folder / _DATASET_DICT).is_file()


def _folder_files(folder: Path) -> list[Path]:
    """The files of a known kind directly in ``folder``, by name; ``.json`` files are not
    taken from a folder (a model's or an image folder's own ``config.json``, ``labels.json``
    are not text to train on; name them ``.jsonl``)."""
    kinds = set(KINDS) - {".json"}
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in kinds)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgumentError(f"{path}: cannot read it ({exc})") from None


def _dataset_files(folder: Path) -> list[Path]:
    """The Arrow files of a ``Dataset.save_to_disk`` folder, in order (its ``state.json``)."""
    state = _read_json(folder / _DATASET)
    try:
        names = [entry["filename"] for entry in state["_data_files"]]
    except (KeyError, TypeError):
        raise InvalidArgumentError(f"{folder / _DATASET}: no _data_files list") from None
    files = []
    for name in names:
        path = folder / str(name)
        if Path(str(name)).name != name or path.suffix != ".arrow" or not path.is_file():
            raise InvalidArgumentError(f"{folder / _DATASET}: lists {name!r}, not an Arrow file "
                                       "of the folder")  # fmt: skip
        files.append(path)
    if not files:
        raise InvalidArgumentError(f"{folder}: the dataset has no data file")
    return files


def _dataset_dict(folder: Path) -> _Split:
    """A ``DatasetDict.save_to_disk`` folder: its "train" split, and its "validation" (else
    "test") split held out when it has one."""
    splits = _read_json(folder / _DATASET_DICT).get("splits", [])
    if "train" not in splits:
        raise InvalidArgumentError(f"{folder}: no 'train' split (its splits: {splits})")
    held = next((s for s in _HELD_OUT_SPLITS if s in splits), None)
    return _Split(
        _dataset_files(folder / "train"),
        _dataset_files(folder / held) if held is not None else None,
    )
