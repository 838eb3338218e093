"""Inputs as fixed units of work, and reading one unit as batches of numbered raw items.

The kinds of input (docs/data_prep.md, "Input"):
- JSON Lines (`.jsonl`, `.json`, `.ndjson`), plain or compressed (`.gz`, `.zst`/`.zstd`, `.bz2`, `.xz`): a plain file
  is cut into byte ranges of about `unit_bytes` (less when the plain files add up to fewer than 64 such ranges: then
  1/64 of their total, at least 1 MiB) that start and end on line boundaries; a compressed file cannot be entered in
  the middle, so it is one unit;
- Parquet: one unit per row group, read one batch of rows at a time with only the record columns;
- Arrow IPC files (what `datasets` `save_to_disk` writes; a `datasets` directory, a DatasetDict directory of them,
  or a single `.arrow` file): one unit per file, memory-mapped and read one record batch at a time.

The plan (the list of units) depends only on the input files and `unit_bytes`, so every host of a sharded run
computes the same plan and unit i always means the same data. Errors name the file and the line (the row, 1-based,
for Parquet and Arrow).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from colossal_shear.data.records import (
    READ_ERRORS,
    RECORD_KEYS,
    DataPrepError,
    compression_of,
    open_decompressed,
)

LINES, PARQUET, ARROW = "lines", "parquet", "arrow"
SPLIT_SCAN = 1 << 16  # bytes read at a time while looking for the end of the line at a split point
MIN_UNITS = 64  # plain JSON Lines are cut finer than unit_bytes so that a small corpus still makes this many units
MIN_UNIT_BYTES = 1 << 20  # ... but never finer than this


@dataclass(frozen=True)
class Unit:
    index: int  # position in the plan: the unit's output and completion record are named after it
    input: int  # which input (the manifest's "inputs" entry) it belongs to
    kind: str  # LINES, PARQUET or ARROW
    path: str  # the file it reads
    start: int  # LINES: byte offset of its first line; PARQUET: the row group; ARROW: 0
    end: int  # LINES: byte offset after its last line, -1 for a whole (compressed) file; PARQUET: start + 1
    first_row: int  # PARQUET: rows of the file before this row group (row numbers in messages); else 0
    size: int  # bytes on disk it stands for (progress)


@dataclass
class InputEntry:
    """One input as the user gave it (a file or a `datasets` directory), with the files it reads."""

    path: str
    kind: str
    files: list[str]

    def fingerprint(self) -> list[list]:
        """[path, size, modification time in ns] of each file: what a resume compares (contents are not hashed)."""
        out = []
        for f in self.files:
            st = os.stat(f)
            out.append([f, st.st_size, st.st_mtime_ns])
        return out


def input_kind(path: Path) -> str:
    name = path.name.lower()
    if path.is_dir():
        return ARROW
    if name.endswith(".parquet"):
        return PARQUET
    if name.endswith(".arrow"):
        return ARROW
    return LINES


def arrow_files(directory: Path) -> list[str]:
    """The Arrow files of a `datasets` directory, in its own order (a DatasetDict: split after split)."""
    try:
        if (directory / "dataset_dict.json").is_file():
            splits = json.loads((directory / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
            return [f for split in splits for f in arrow_files(directory / split)]
        state = json.loads((directory / "state.json").read_text(encoding="utf-8"))
        return [str(directory / f["filename"]) for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataPrepError(f"{directory}: not a readable datasets save_to_disk directory: {e}") from None


def text_columns(names: list[str], path: str, text_field: str | None) -> list[str]:
    """The record columns a table has; an error naming the file and its columns when the text column is missing."""
    wanted = [text_field, "source", "category"] if text_field else [*RECORD_KEYS, "category"]
    if text_field and text_field not in names:
        raise DataPrepError(f"{path}: no column '{text_field}' (the --text_field); its columns: {', '.join(names)}")
    if not text_field and "target" not in names and "text" not in names:
        raise DataPrepError(
            f"{path}: no 'target' or 'text' column; its columns: {', '.join(names)} (name the text "
            "column with --text_field)"
        )
    return [c for c in wanted if c in names]


def plan(files: list[Path], unit_bytes: int, text_field: str | None) -> tuple[list[InputEntry], list[Unit]]:
    """The inputs and their units, in input order. Reads only metadata and a few bytes at each split point."""
    entries: list[InputEntry] = []
    units: list[Unit] = []
    plain = sum(p.stat().st_size for p in files if input_kind(p) == LINES and compression_of(p) is None)
    unit_bytes = min(unit_bytes, max(MIN_UNIT_BYTES, plain // MIN_UNITS))  # every core busy on a small corpus too
    for i, path in enumerate(files):
        kind = input_kind(path)
        if kind == ARROW:
            members = arrow_files(path) if path.is_dir() else [str(path)]
        else:
            members = [str(path)]
        entries.append(InputEntry(str(path), kind, members))
        for member in members:
            for start, end, first_row, size in _spans(kind, member, unit_bytes, text_field):
                units.append(Unit(len(units), i, kind, member, start, end, first_row, size))
    return entries, units


def _spans(kind: str, path: str, unit_bytes: int, text_field: str | None) -> list[tuple[int, int, int, int]]:
    if kind == PARQUET:
        meta = _parquet_file(path).metadata
        text_columns(meta.schema.to_arrow_schema().names, path, text_field)
        spans, row = [], 0
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            size = sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))
            spans.append((g, g + 1, row, size))
            row += rg.num_rows
        return spans
    size = os.path.getsize(path)
    if kind == ARROW:
        with _arrow_reader(path) as reader:
            text_columns(reader.schema.names, path, text_field)
        return [(0, -1, 0, size)]
    if compression_of(path) is not None:
        return [(0, -1, 0, size)]
    return [(s, e, 0, e - s) for s, e in _line_splits(path, size, unit_bytes)]


def _line_splits(path: str, size: int, unit_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges of about `unit_bytes` each, every one starting at the beginning of a line."""
    cuts = [0]
    with open(path, "rb") as f:
        target = unit_bytes
        while target < size:
            f.seek(target - 1)  # a range starts right after a newline: look from the byte before the cut
            pos = target - 1
            while True:
                chunk = f.read(SPLIT_SCAN)
                if not chunk:
                    pos = size
                    break
                k = chunk.find(b"\n")
                if k >= 0:
                    pos += k + 1
                    break
                pos += len(chunk)
            if pos >= size:
                break
            cuts.append(pos)
            target = max(pos, target) + unit_bytes
    cuts.append(size)
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a] or [(0, 0)]


def _parquet_file(path: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataPrepError(f"{path}: cannot read as Parquet: {e}") from None


class _arrow_reader:
    """An Arrow IPC file (stream format, as `datasets` writes, or file format), memory-mapped."""

    def __init__(self, path: str):
        import pyarrow as pa

        self.path = path
        try:
            self._source = pa.memory_map(path)
            try:
                self.reader = pa.ipc.open_stream(self._source)
                self.batches = iter(self.reader)
            except pa.ArrowInvalid:
                self._source.seek(0)
                f = pa.ipc.open_file(self._source)
                self.reader = f
                self.batches = (f.get_batch(i) for i in range(f.num_record_batches))
        except (OSError, ValueError) as e:
            raise DataPrepError(f"{path}: cannot read as Arrow: {e}") from None
        self.schema = self.reader.schema

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._source.close()


def read_unit(unit: Unit, batch_rows: int, text_field: str | None, batch_bytes: int) -> Iterator[list[tuple]]:
    """Batches of (number, payload) for one unit: payload is a raw line (bytes) for JSON Lines, a dict of the
    record columns for a table. Numbers are 1-based lines or rows of the file, except in a JSON Lines range that
    starts mid-file: there they are provisional (lines into the range + 1, see `line_base`)."""
    if unit.kind == LINES:
        yield from _line_batches(unit, batch_rows, batch_bytes)
    elif unit.kind == PARQUET:
        pf = _parquet_file(unit.path)
        columns = text_columns(pf.schema_arrow.names, unit.path, text_field)
        row = unit.first_row
        try:
            for batch in pf.iter_batches(
                batch_size=batch_rows, row_groups=[unit.start], columns=columns, use_threads=False
            ):
                yield _rows(batch, row)
                row += batch.num_rows
        except READ_ERRORS as e:
            raise DataPrepError(f"{unit.path}: cannot read: {e}") from e
    else:
        with _arrow_reader(unit.path) as reader:
            columns = text_columns(reader.schema.names, unit.path, text_field)
            row = 0
            for batch in reader.batches:
                batch = batch.select(columns)
                for lo in range(0, batch.num_rows, batch_rows):
                    part = batch.slice(lo, batch_rows)
                    yield _rows(part, row)
                    row += part.num_rows


def _rows(batch, first: int) -> list[tuple[int, dict]]:
    """Numbered rows as dicts; a null cell is an absent key (a table has every column in every row, so a corpus
    mixing `text` and `target` records has nulls in both columns)."""
    names = batch.schema.names
    cols = [batch.column(i).to_pylist() for i in range(len(names))]
    return [
        (first + j + 1, {k: v for k, v in zip(names, values) if v is not None}) for j, values in enumerate(zip(*cols))
    ]


def _line_batches(unit: Unit, batch_lines: int, batch_bytes: int) -> Iterator[list[tuple[int, bytes]]]:
    try:
        raw = open(unit.path, "rb")
    except OSError as e:
        raise DataPrepError(f"{unit.path}: cannot read: {e.strerror or e}") from None
    with raw:
        stream = open_decompressed(raw, compression_of(unit.path))
        if unit.end >= 0:
            raw.seek(unit.start)
        pos, number = unit.start, 1 if unit.start == 0 else 2
        batch, size = [], 0
        try:
            for line in stream:
                if 0 <= unit.end <= pos:
                    break
                pos += len(line)
                batch.append((number, line))
                number += 1
                size += len(line)
                if len(batch) >= batch_lines or size >= batch_bytes:
                    yield batch
                    batch, size = [], 0
        except READ_ERRORS as e:  # truncated or corrupt compressed data, an I/O error
            raise DataPrepError(f"{unit.path}: cannot read: {e}") from e
        if batch:
            yield batch


def line_base(unit: Unit) -> int:
    """What to add to a provisional line number of `unit` to get the line of the file: 0 for a unit that starts
    the file; else the lines before its start, minus 1. Counted only when a message needs it."""
    if unit.kind != LINES or unit.start == 0:
        return 0
    n, left = 0, unit.start
    with open(unit.path, "rb") as f:
        while left > 0:
            chunk = f.read(min(left, 1 << 24))
            if not chunk:
                break
            n += chunk.count(b"\n")
            left -= len(chunk)
    return n - 1


def unit_key(unit: Unit) -> dict:
    return asdict(unit)
