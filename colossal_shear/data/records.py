"""Finding the input files, reading them lazily (plain or gzip) and validating each JSONL line.

Reading happens in the main process (cheap: raw bytes only); decoding, JSON parsing and validation happen in the
tokenisation workers (`parse_record`), so a corpus larger than RAM streams through a bounded window of line batches.
Every problem is reported as `<file>:<line>: <what is wrong> (field 'x')` with a machine-readable `reason`, which
`--skip_invalid` counts in the manifest instead of stopping.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

from colossal_shear.errors import UserError

INPUT_SUFFIXES = (".jsonl", ".jsonl.gz")
UNKNOWN_CATEGORY = "unknown"

# reasons a record is rejected (the keys of the manifest's "skipped")
INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
UNENCODABLE_TEXT = "unencodable_text"
REASONS = (INVALID_UTF8, INVALID_JSON, NOT_AN_OBJECT, MISSING_FIELD, WRONG_TYPE, UNENCODABLE_TEXT)


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
    category: str


def discover_inputs(specs: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand directories (their `.jsonl` / `.jsonl.gz` files, not recursive, sorted by name) and keep single files
    as given, in the order given, without duplicates. An empty directory or a missing path is an error."""
    files: list[Path] = []
    seen: set[Path] = set()
    if not specs:
        raise DataPrepError("no input given (--data_input_dirs is empty)")
    for spec in specs:
        p = Path(spec).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(INPUT_SUFFIXES))
            if not found:
                raise DataPrepError(f"{p}: no {' or '.join(INPUT_SUFFIXES)} files in this input directory")
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


class LineReader:
    """Raw lines of one input file with their 1-based numbers; `.position` is the offset in the file on disk (the
    compressed offset for .gz), for a progress bar over bytes."""

    def __init__(self, path: Path):
        self.path = path
        self._raw: BinaryIO = open(path, "rb")
        self._stream: BinaryIO = gzip.GzipFile(fileobj=self._raw, mode="rb") if path.name.endswith(".gz") else self._raw

    @property
    def position(self) -> int:
        return self._raw.tell()

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        try:
            for number, line in enumerate(self._stream, start=1):
                yield number, line
        except (OSError, EOFError, gzip.BadGzipFile) as e:  # truncated or corrupt gzip
            raise DataPrepError(f"{self.path}: cannot read: {e}") from e

    def close(self) -> None:
        if self._stream is not self._raw:
            self._stream.close()
        self._raw.close()

    def __enter__(self) -> "LineReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _type_name(v) -> str:
    return "null" if v is None else {dict: "object", list: "array", bool: "boolean", str: "string"}.get(
        type(v), "number" if isinstance(v, (int, float)) else type(v).__name__)


def parse_record(raw: bytes, file: str, line: int) -> Record | None:
    """Decode and validate one line. Returns None for a blank line; raises RecordError for anything wrong.

    Accepted: {"source"?: str, "target": str, "category"?: str} and {"text": str, "category"?: str} (target only).
    `source`/`category` may be missing, null or empty (category then "unknown"); `text` is read only when `target`
    is absent. Other keys are ignored.
    """
    where = f"{file}:{line}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(f"{where}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})",
                          INVALID_UTF8, file, line) from None
    if line == 1 and text.startswith("\ufeff"):
        text = text[1:]  # a UTF-8 byte-order mark at the start of the file
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"{where}: invalid JSON: {e.msg} (column {e.colno})", INVALID_JSON, file, line) from None
    if not isinstance(obj, dict):
        raise RecordError(f"{where}: expected a JSON object, got {_type_name(obj)}", NOT_AN_OBJECT, file, line)
    key = "target" if "target" in obj or "text" not in obj else "text"
    if key not in obj:
        raise RecordError(f"{where}: missing field (field 'target'; or give 'text')", MISSING_FIELD, file, line)
    target = obj[key]
    if not isinstance(target, str):
        raise RecordError(f"{where}: expected a string, got {_type_name(target)} (field '{key}')", WRONG_TYPE, file, line)
    source = obj.get("source")
    if source is None:
        source = ""
    elif not isinstance(source, str):
        raise RecordError(f"{where}: expected a string, got {_type_name(source)} (field 'source')", WRONG_TYPE, file, line)
    category = obj.get("category")
    if category is None or category == "":
        category = UNKNOWN_CATEGORY
    elif not isinstance(category, str):
        raise RecordError(f"{where}: expected a string, got {_type_name(category)} (field 'category')",
                          WRONG_TYPE, file, line)
    return Record(source, target, category)
