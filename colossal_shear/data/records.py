"""Input records: the one JSONL record reader of the package, and the files it reads (plain or gzip), lazily.

Every consumer reads records through this module: data preparation (`parse_record`, in the tokenisation workers),
vocabulary counting and learning (`colossal_shear.vocab.corpus`), calibration (`pruning.oneshot`), the run report
and the bundled corpus (`iter_texts`). So one record gives the same text everywhere.

The rule for a record (one JSON object per line; docs/data_prep.md, "Input"):
- `target` (string): the text the model learns. `text` is another name for it, for target-only corpora: a record
  gives one of the two; one that gives both is ambiguous and an error (reason `ambiguous_text`), never a guess;
- `source` (string, optional; missing, null or "" is none): a prefix the model reads but is not trained on;
- `category` (string, optional; missing, null or "" is none, which data preparation files under "unknown");
- other keys are ignored; blank lines are skipped; a UTF-8 byte-order mark at the start of a file is ignored.
Where a record is read as text (vocabulary counting and learning, calibration, tokens per character in the report)
its text is `Record.text` = source + target: what the model reads.

Files: data preparation reads JSON Lines, Parquet and `datasets` directories (colossal_shear.data.sources); a file
given by name that is neither Parquet nor Arrow is read as JSONL. The other consumers read a corpus file with
`iter_texts`: JSONL when its name ends in `.jsonl`, `.json` or `.ndjson` (optionally followed by a compression
suffix) or its first non-blank line is a JSON object with one of the record keys; otherwise plain UTF-8 text, in
blocks of lines. A name ending in `.gz`, `.zst`/`.zstd`, `.bz2` or `.xz` is read through that decompressor.

`text_field` (data preparation's `--text_field`): the name of the target field for corpora whose text column has
another name (`content`, `raw_content`); when given, that field is the target and `target`/`text` are ignored like
any other key.

Every problem is reported as `<file>:<line>: <what is wrong> (field 'x')`, as a `RecordError` with a
machine-readable `reason` (one of REASONS), which data preparation's `--skip_invalid` counts in the manifest instead of
stopping.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from colossal_shear.core.errors import UserError
from colossal_shear.core.logger import get_logger

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")  # what `is_jsonl` takes as JSONL without looking inside
COMPRESSION_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2", ".xz": "xz"}
TABLE_SUFFIXES = (".parquet", ".arrow")  # Parquet; Arrow IPC (what `datasets.save_to_disk` writes)
# what data preparation takes from an input directory: JSONL plain or compressed, Parquet, Arrow
INPUT_SUFFIXES = tuple(s + c for s in JSONL_SUFFIXES for c in ("", *COMPRESSION_SUFFIXES)) + TABLE_SUFFIXES
RECORD_KEYS = ("target", "text", "source")
log = get_logger(__name__)
UNKNOWN_CATEGORY = "unknown"
# Plain text is read in blocks of this many lines, newlines kept, so that newline and indentation tokens are seen
# (counting line by line would never see them, and vocabulary pruning would then drop them).
PLAIN_BLOCK_LINES = 32

# reasons a record is rejected (the keys of the manifest's "skipped")
INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
AMBIGUOUS_TEXT = "ambiguous_text"
WRONG_TYPE = "wrong_type"
UNENCODABLE_TEXT = "unencodable_text"
REASONS = (INVALID_UTF8, INVALID_JSON, NOT_AN_OBJECT, MISSING_FIELD, AMBIGUOUS_TEXT, WRONG_TYPE, UNENCODABLE_TEXT)


class DataPrepError(UserError, ValueError):
    """A problem with the inputs, the tokenizer or the output directory, worded for the user."""


class RecordError(DataPrepError):
    """One bad input line. `reason` is one of REASONS; the message names the file and the line."""

    def __init__(self, message: str, reason: str = "", file: str = "", line: int = 0):
        super().__init__(message)
        self.reason, self.file, self.line = reason, file, line

    def __reduce__(self):  # picklable across worker processes despite the extra fields
        return (type(self), (self.args[0], self.reason, self.file, self.line))


@dataclass(frozen=True)
class Record:
    source: str
    target: str
    category: str | None  # None: the record has none

    @property
    def text(self) -> str:
        """What the model reads of this record: source + target."""
        return self.source + self.target


@dataclass(frozen=True)
class CorpusText:
    """One text of a corpus file: a record's `Record.text`, or a block of plain-text lines (category None)."""

    text: str
    category: str | None
    file: str
    line: int  # of the record, or the first line of the block
    nbytes: int  # bytes of the file on disk read for it (for progress bars over the file size)


def is_datasets_dir(path: Path) -> bool:
    """A directory written by `datasets` `save_to_disk` (a Dataset, or a DatasetDict of them)."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def discover_inputs(specs: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand directories (their files with an input suffix, any case, not recursive, sorted by name; a `.json` file
    only when it is JSON Lines) and keep single files and `datasets` directories as given, in the order given,
    without duplicates. What a directory holds besides (hidden names aside) is named in one warning line. An empty
    directory or a missing path is an error."""
    files: list[Path] = []
    seen: set[Path] = set()
    if not specs:
        raise DataPrepError("no input given (--data_input_dirs is empty)")
    for spec in specs:
        p = Path(spec).expanduser()
        if p.is_dir() and is_datasets_dir(p):
            found = [p]
        elif p.is_dir():
            found = _directory_inputs(p)
            if not found:
                raise DataPrepError(
                    f"{p}: no .jsonl or .jsonl.gz files in this input directory (nor any other "
                    "input: .json/.ndjson, compressed .gz/.zst/.bz2/.xz, .parquet, .arrow, or a "
                    "datasets save_to_disk directory)"
                )
        elif p.is_file():
            found = [p]
        else:
            raise DataPrepError(f"{p}: input path does not exist")
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                files.append(f)
    return files


MAX_NAMED = 10  # skipped entries named in the warning


def _directory_inputs(directory: Path) -> list[Path]:
    found, skipped = [], []
    for f in sorted(directory.iterdir()):
        if f.name.startswith("."):
            continue
        if not f.is_file():
            skipped.append(f"{f.name}/")
        elif not f.name.lower().endswith(INPUT_SUFFIXES):
            skipped.append(f.name)
        elif _is_json_document(f):
            skipped.append(f"{f.name} (a JSON document, not JSON Lines)")
        else:
            found.append(f)
    if skipped:
        more = f" and {len(skipped) - MAX_NAMED} more" if len(skipped) > MAX_NAMED else ""
        log.warning(
            f"prepare_dataset: {directory}: skipped {len(skipped)} entries that are not inputs (not read "
            f"recursively; see docs/data_prep.md, Formats): {', '.join(skipped[:MAX_NAMED])}{more}"
        )
    return found


def _is_json_document(path: Path) -> bool:
    """A `.json` name (compressed or not) whose first non-blank line is not a JSON object: an array, a pretty-printed
    object, a configuration file; JSON Lines otherwise. A file that cannot be read is taken (reading it reports)."""
    name = path.name.lower()
    if not any(name.endswith(".json" + c) for c in ("", *COMPRESSION_SUFFIXES)):
        return False
    try:
        with LineReader(path) as reader:
            for number, raw in reader:
                if raw.strip():
                    parse_json_object(decode_line(raw, str(path), number), str(path), number)
                    return False
    except RecordError:
        return True
    except DataPrepError:
        return False
    return False


def compression_of(path: str | os.PathLike) -> str | None:
    """The compression a file's name says it has ('gzip', 'zstd', 'bz2', 'xz'), or None."""
    name = Path(path).name.lower()
    return next((c for suffix, c in COMPRESSION_SUFFIXES.items() if name.endswith(suffix)), None)


def open_decompressed(raw: BinaryIO, compression: str | None) -> BinaryIO:
    """A buffered binary stream of `raw`'s content. zstd goes through pyarrow (already a dependency), which reads
    multi-frame files and streams them."""
    if compression is None:
        return raw
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression == "bz2":
        return bz2.BZ2File(raw, mode="rb")
    if compression == "xz":
        return lzma.LZMAFile(raw, mode="rb")
    import pyarrow as pa

    return io.BufferedReader(pa.CompressedInputStream(pa.PythonFile(raw, mode="r"), "zstd"), 1 << 20)


READ_ERRORS = (OSError, EOFError, gzip.BadGzipFile, lzma.LZMAError)


class LineReader:
    """Raw lines of one input file (decompressed when its name ends in `.gz`, `.zst`, `.zstd`, `.bz2` or `.xz`) with
    their 1-based numbers; `.position` is the offset in the file on disk (the compressed offset), for a progress
    bar over bytes."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._raw: BinaryIO = open(self.path, "rb")
        except OSError as e:
            raise DataPrepError(f"{self.path}: cannot read: {e.strerror or e}") from None
        self._stream: BinaryIO = open_decompressed(self._raw, compression_of(self.path))

    @property
    def position(self) -> int:
        try:
            return self._raw.tell()
        except ValueError:  # closed under us by a decompressor that owns it
            return 0

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        try:
            yield from enumerate(self._stream, start=1)
        except READ_ERRORS as e:  # truncated or corrupt compressed data, an I/O error
            raise DataPrepError(f"{self.path}: cannot read: {e}") from e

    def close(self) -> None:
        if self._stream is not self._raw:
            self._stream.close()
        self._raw.close()

    def __enter__(self) -> LineReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _type_name(v) -> str:
    return (
        "null"
        if v is None
        else {dict: "object", list: "array", bool: "boolean", str: "string"}.get(
            type(v), "number" if isinstance(v, (int, float)) else type(v).__name__
        )
    )


def decode_line(raw: bytes, file: str, line: int) -> str:
    """One raw line as text (newline kept; a byte-order mark at the start of the file dropped)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(
            f"{file}:{line}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})", INVALID_UTF8, file, line
        ) from None
    return text[1:] if line == 1 and text.startswith("\ufeff") else text


def parse_json_object(text: str, file: str, line: int) -> dict | None:
    """The JSON object on one decoded line; None for a blank line."""
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(
            f"{file}:{line}: invalid JSON: {e.msg} (column {e.colno})", INVALID_JSON, file, line
        ) from None
    if not isinstance(obj, dict):
        raise RecordError(f"{file}:{line}: expected a JSON object, got {_type_name(obj)}", NOT_AN_OBJECT, file, line)
    return obj


def _optional_string(obj: dict, key: str, file: str, line: int) -> str | None:
    value = obj.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise RecordError(
            f"{file}:{line}: expected a string, got {_type_name(value)} (field '{key}')", WRONG_TYPE, file, line
        )
    return value


def record_from_object(obj: dict, file: str, line: int, text_field: str | None = None) -> Record:
    """Apply the record rule (module docstring) to one parsed JSON object (or one row of a table)."""
    if text_field:
        key = text_field
        if key not in obj:
            raise RecordError(
                f"{file}:{line}: missing field (field '{key}', the --text_field)", MISSING_FIELD, file, line
            )
    else:
        if "text" in obj and "target" in obj:
            raise RecordError(
                f"{file}:{line}: ambiguous record: both 'text' and 'target' are given (field 'text'); "
                "'text' is another name for 'target': give one of them",
                AMBIGUOUS_TEXT,
                file,
                line,
            )
        key = "text" if "text" in obj else "target"
        if key not in obj:
            raise RecordError(
                f"{file}:{line}: missing field (field 'target'; or give 'text')", MISSING_FIELD, file, line
            )
    target = obj[key]
    if not isinstance(target, str):
        raise RecordError(
            f"{file}:{line}: expected a string, got {_type_name(target)} (field '{key}')", WRONG_TYPE, file, line
        )
    source = _optional_string(obj, "source", file, line) or ""
    return Record(source, target, _optional_string(obj, "category", file, line))


def parse_record(raw: bytes, file: str, line: int, text_field: str | None = None) -> Record | None:
    """Decode and validate one raw line. Returns None for a blank line; raises RecordError for anything wrong."""
    obj = parse_json_object(decode_line(raw, file, line), file, line)
    return None if obj is None else record_from_object(obj, file, line, text_field)


def _sized_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes, int]]:
    """(line number, raw line, bytes of the file on disk read since the previous line: for progress bars over the
    file size, also of a gzip file)."""
    with LineReader(path) as reader:
        seen = 0
        for number, raw in reader:
            position = reader.position
            yield number, raw, position - seen
            seen = position


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, str, int]]:
    """(line number, decoded line with its newline, bytes read from disk) of a text file (decompressed per its name)."""
    file = str(path)
    for number, raw, nbytes in _sized_lines(path):
        yield number, decode_line(raw, file, number), nbytes


def is_jsonl(path: str | os.PathLike, keys: Sequence[str] = RECORD_KEYS) -> bool:
    """JSONL by its name (`.jsonl`, `.json`, `.ndjson`, optionally compressed), else when its first non-blank line is a
    JSON object with one of `keys`."""
    name = Path(path).name.lower()
    for suffix in COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    if name.endswith(JSONL_SUFFIXES):
        return True
    for _, line, _ in iter_lines(path):
        if line.strip():
            try:
                obj = json.loads(line)
            except ValueError:
                return False
            return isinstance(obj, dict) and any(k in obj for k in keys)
    return False


def iter_records(path: str | os.PathLike) -> Iterator[tuple[int, int, Record]]:
    """(line number, bytes read from disk, record) of every record of a JSONL file (decompressed per its name)."""
    file = str(path)
    for number, raw, nbytes in _sized_lines(path):
        record = parse_record(raw, file, number)
        if record is not None:
            yield number, nbytes, record


def iter_texts(path: str | os.PathLike, block_lines: int = PLAIN_BLOCK_LINES) -> Iterator[CorpusText]:
    """The texts of one corpus file: `Record.text` of each record of a JSONL file (`is_jsonl`), or blocks of
    `block_lines` lines (newlines kept) of a plain-text file."""
    file = str(path)
    if is_jsonl(path):
        for number, nbytes, record in iter_records(path):
            yield CorpusText(record.text, record.category, file, number, nbytes)
        return
    block: list[str] = []
    start = size = 0
    for number, line, nbytes in iter_lines(path):
        if not block:
            start = number
        block.append(line)
        size += nbytes
        if len(block) >= block_lines:
            yield CorpusText("".join(block), None, file, start, size)
            block, size = [], 0
    if block:
        yield CorpusText("".join(block), None, file, start, size)


def texts(paths: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Just the texts of `iter_texts`, file after file."""
    for path in paths:
        for item in iter_texts(path):
            yield item.text
