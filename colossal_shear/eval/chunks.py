"""A long evaluation in pieces (`bench/eval_accuracy.py --chunk`): each task's documents scored `size` at a time
(`harness.run_tasks(samples=...)`), each finished piece stored at once in one JSON file, the task's figures pooled
(`results.pool`) when its last piece is in. A stopped run resumes at the next piece; several processes share the
pieces (`shard`) and the file: each read-modify-write holds an exclusive `flock` on `<file>.lock` and replaces the file
atomically, so no process loses another's pieces and a reader never sees half a file.

The file: {task: entry}. A finished task's entry is {acc, acc_norm, acc_stderr, n, seconds} (seconds: summed over its
pieces); an unfinished one is {"docs": D, "chunk": size, "chunks": {"0": {acc, acc_norm, acc_stderr, n, seconds},
"1000": {...}, ...}}, keyed by each piece's first document.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from pathlib import Path

from colossal_shear.core.errors import ConfigError
from colossal_shear.eval.results import pool, write_results


def chunk_starts(docs: int, size: int) -> list[int]:
    """The first document of each piece of `size` documents (the last one may be shorter)."""
    if size < 1:
        raise ConfigError(f"--chunk: expected a positive number of documents, got {size}")
    return list(range(0, docs, size))


def chunk_docs(start: int, docs: int, size: int) -> list[int]:
    return list(range(start, min(start + size, docs)))


def parse_shard(text: str) -> tuple[int, int]:
    """`i/n` (0 <= i < n): this process takes every n-th piece of each task, from the i-th."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise ConfigError(f"--shard: expected i/n with 0 <= i < n (e.g. 0/2), got {text!r}")
    return index, count


@contextlib.contextmanager
def locked(path: Path) -> Iterator[dict]:
    """The file's content (empty when absent), under an exclusive lock held until the block ends."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_store(path: Path) -> dict:
    with locked(path) as data:
        return data


def is_finished(entry: dict | None) -> bool:
    return entry is not None and "chunks" not in entry


def _check_layout(entry: dict, task: str, docs: int, size: int, path: Path) -> None:
    if (entry["docs"], entry["chunk"]) != (docs, size):
        raise ConfigError(
            f"{path}: {task} is being scored in pieces of {entry['chunk']} of {entry['docs']} documents, not "
            f"{size} of {docs}: give --chunk {entry['chunk']} (and the same --limit) or another --out"
        )


def pending(path: Path, task: str, docs: int, size: int, shard: tuple[int, int] = (0, 1)) -> list[int]:
    """The first documents of this shard's pieces of `task` not yet stored (none when the task is finished)."""
    entry = read_store(path).get(task)
    if is_finished(entry):
        return []
    done = set()
    if entry is not None:
        _check_layout(entry, task, docs, size, path)
        done = {int(start) for start in entry["chunks"]}
    index, count = shard
    return [start for start in chunk_starts(docs, size)[index::count] if start not in done]


def store_chunk(path: Path, task: str, start: int, scores: dict, docs: int, size: int) -> dict:
    """Stores one piece's {acc, acc_norm, acc_stderr, n, seconds}; the task's entry after it (pooled when it was the
    last piece)."""
    with locked(path) as data:
        entry = data.get(task)
        if is_finished(entry):
            return entry
        entry = entry or {"docs": docs, "chunk": size, "chunks": {}}
        _check_layout(entry, task, docs, size, path)
        entry["chunks"][str(start)] = scores
        entry["chunks"] = {str(s): entry["chunks"][str(s)] for s in sorted(map(int, entry["chunks"]))}
        starts = chunk_starts(docs, size)
        if set(entry["chunks"]) == {str(s) for s in starts}:
            chunks = [entry["chunks"][str(s)] for s in starts]
            entry = {**pool(chunks), "seconds": round(sum(c["seconds"] for c in chunks), 1)}
        data[task] = entry
        write_results(path, data)
    return entry


def store_task(path: Path, task: str, entry: dict) -> None:
    """A task scored in one go: its entry, written under the lock beside the other tasks'."""
    with locked(path) as data:
        data[task] = entry
        write_results(path, data)
