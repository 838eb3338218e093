"""Arrow I/O: per-category spill files written while packing, and the final parts written from them.

Pass 1 appends packed sequences to one Arrow IPC file per category (flushed every `buffer_rows` sequences, so
memory stays bounded). Pass 2 memory-maps those files, gathers each part's rows in chunks and writes the part with
`datasets.Dataset.save_to_disk`, so `datasets.load_from_disk` reads it back as is.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from colossal_shear.data.packing import PackedRows

SPILL_SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("doc_lengths", pa.list_(pa.int32())),
        ("num_tokens", pa.int32()),
        ("loss_tokens", pa.int32()),
        ("documents", pa.int32()),
    ]
)
OUTPUT_COLUMNS = ("input_ids", "labels", "doc_lengths", "doc_categories", "category", "num_tokens")


def features():
    """The columns of every output sequence (the contract with the trainer)."""
    from datasets import Features, List, Value

    ints = List(Value("int32"))
    return Features(
        {
            "input_ids": ints,
            "labels": ints,
            "doc_lengths": ints,
            "doc_categories": List(Value("string")),
            "category": Value("string"),
            "num_tokens": Value("int32"),
        }
    )


def _fixed_lists(block: np.ndarray) -> pa.ListArray:
    n, width = block.shape
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(block.reshape(-1)))


def _ragged_lists(values: np.ndarray, counts: np.ndarray) -> pa.ListArray:
    offsets = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))


def packed_to_batch(rows: PackedRows) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(
        [
            _fixed_lists(rows.input_ids),
            _fixed_lists(rows.labels),
            _ragged_lists(rows.segment_lengths, rows.segment_counts),
            pa.array(rows.num_tokens),
            pa.array(rows.loss_tokens),
            pa.array(rows.documents),
        ],
        schema=SPILL_SCHEMA,
    )


class SpillStore:
    """One Arrow IPC file per category under `directory`; sequences are buffered and all buffers are flushed once
    `buffer_rows` sequences are held in total."""

    def __init__(self, directory: Path, buffer_rows: int):
        self.directory = directory
        self.buffer_rows = buffer_rows
        self.directory.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, Path] = {}
        self._writers: dict[str, pa.ipc.RecordBatchFileWriter] = {}
        self._buffers: dict[str, list[PackedRows]] = {}
        self._buffered = 0
        self.counts: dict[str, int] = {}

    def add(self, category: str, rows: PackedRows | None) -> None:
        if rows is None or len(rows) == 0:
            return
        self._buffers.setdefault(category, []).append(rows)
        self.counts[category] = self.counts.get(category, 0) + len(rows)
        self._buffered += len(rows)
        if self._buffered >= self.buffer_rows:
            self.flush()

    def flush(self) -> None:
        for cat, blocks in self._buffers.items():
            if cat not in self._writers:
                self._files[cat] = self.directory / f"category-{len(self._files):05d}.arrow"
                self._writers[cat] = pa.ipc.new_file(str(self._files[cat]), SPILL_SCHEMA)
            for block in blocks:
                self._writers[cat].write_batch(packed_to_batch(block))
        self._buffers.clear()
        self._buffered = 0

    def close(self) -> None:
        self.flush()
        for w in self._writers.values():
            w.close()
        self._writers.clear()

    def table(self, category: str) -> SpilledRows:
        return SpilledRows(self._files[category])


class SpilledRows:
    """Random access to one category's spilled sequences through a memory map: `take` gathers from the record
    batches that hold the rows, so only the requested rows are ever copied (a table-level take over a chunked
    column may concatenate the whole column first)."""

    def __init__(self, path: Path):
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        self._batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        self._starts = np.cumsum([0] + [b.num_rows for b in self._batches])
        self.num_rows = int(self._starts[-1])

    def take(self, rows: np.ndarray) -> pa.Table:
        which = np.searchsorted(self._starts, rows, side="right") - 1
        order = np.argsort(which, kind="stable")
        pieces = []
        for b in np.unique(which):
            sel = rows[which == b] - self._starts[b]
            pieces.append(self._batches[b].take(pa.array(sel)))
        table = pa.Table.from_batches(pieces, schema=SPILL_SCHEMA)
        return table.take(pa.array(np.argsort(order, kind="stable")))


class PartStats:
    """Per-category counts of one part, for the manifest."""

    def __init__(self):
        self.categories: dict[str, dict[str, int]] = {}

    def add(self, category: str, table: pa.Table) -> None:
        s = self.categories.setdefault(
            category, {"sequences": 0, "tokens": 0, "loss_tokens": 0, "documents": 0, "segments": 0}
        )
        s["sequences"] += table.num_rows
        for key, col in (("tokens", "num_tokens"), ("loss_tokens", "loss_tokens"), ("documents", "documents")):
            s[key] += int(pc.sum(table[col]).as_py() or 0)
        s["segments"] += int(pc.sum(pc.list_value_length(table["doc_lengths"])).as_py() or 0)


def part_chunks(
    tables: dict[str, SpilledRows],
    categories: list[str],
    codes: np.ndarray,
    rows: np.ndarray,
    chunk_rows: int,
    stats: PartStats,
) -> Iterator[pa.Table]:
    """The rows of one part in the given order, as output tables of at most `chunk_rows` sequences."""
    for lo in range(0, len(rows), chunk_rows):
        c, r = codes[lo : lo + chunk_rows], rows[lo : lo + chunk_rows]
        pieces, positions = [], []
        for code in np.unique(c):
            sel = np.nonzero(c == code)[0]
            cat = categories[code]
            taken = tables[cat].take(r[sel])
            stats.add(cat, taken)
            segs = pc.list_value_length(taken["doc_lengths"]).to_numpy(zero_copy_only=False)
            doc_categories = pa.ListArray.from_arrays(
                pa.array(np.concatenate([[0], np.cumsum(segs)]).astype(np.int32)),
                pa.array(np.full(int(segs.sum()), cat, dtype=object), pa.string()),
            )
            pieces.append(
                pa.table(
                    {
                        "input_ids": taken["input_ids"],
                        "labels": taken["labels"],
                        "doc_lengths": taken["doc_lengths"],
                        "doc_categories": doc_categories,
                        "category": pa.array([cat] * taken.num_rows, pa.string()),
                        "num_tokens": taken["num_tokens"],
                    }
                )
            )
            positions.append(sel)
        chunk = pa.concat_tables(pieces)
        yield chunk.take(pa.array(np.argsort(np.concatenate(positions), kind="stable")))


def write_part(part_dir: Path, scratch_file: Path, chunks: Iterator[pa.Table], jsonl_file: Path | None = None) -> int:
    """Stream `chunks` into one Arrow file, then save it as a `datasets` dataset at `part_dir`.

    The fingerprint is a hash of the content, so the same input and seed give byte-identical parts."""
    from datasets import Dataset, DatasetInfo
    from datasets.table import MemoryMappedTable

    feats = features()
    schema = feats.arrow_schema
    digest = hashlib.sha256()
    n = 0
    jsonl = open(jsonl_file, "w", encoding="utf-8") if jsonl_file is not None else None
    try:
        with pa.OSFile(str(scratch_file), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for chunk in chunks:
                chunk = chunk.select(list(OUTPUT_COLUMNS)).cast(schema)
                for col in ("input_ids", "labels", "doc_lengths"):
                    digest.update(chunk[col].combine_chunks().flatten().to_numpy().tobytes())
                digest.update("\n".join(chunk["category"].to_pylist()).encode("utf-8"))
                writer.write_table(chunk)
                n += chunk.num_rows
                if jsonl is not None:
                    for row in chunk.to_pylist():
                        jsonl.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        if jsonl is not None:
            jsonl.close()
    ds = Dataset(
        MemoryMappedTable.from_file(str(scratch_file)),
        info=DatasetInfo(features=feats),
        fingerprint=digest.hexdigest()[:32],
    )
    ds.save_to_disk(str(part_dir))
    del ds
    scratch_file.unlink()
    return n
