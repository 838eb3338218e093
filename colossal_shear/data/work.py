"""The work directory of a resumable, shardable run: one committed output per unit, and what the run was.

`.<output name>.work/` beside the output directory holds
- `state.json`: what the units depend on and what the result depends on (the settings, the tokenizer hash, every
  input file's size and modification time, the plan). A rerun compares its own with it and refuses any difference,
  naming it; the same command resumes.
- `units/u-XXXXXXX.arrow`: the documents of unit X (token ids, the masked prefix length and the category of each
  document, in input order), written under a temporary name and renamed when complete;
- `units/u-XXXXXXX.json`: its completion record (lines read, records kept, lines skipped per reason), written
  atomically after the Arrow file: a unit is done exactly when this file exists.
- `failed-shard-K.txt`: the error that stopped shard K (so that the shard that merges stops waiting).
Units are independent of each other and of the host that made them, so a resumed or sharded run packs the same
documents in the same order as a run in one go, and its result is byte-identical.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa

from colossal_shear.core.fsutil import atomic_write_text
from colossal_shear.data.records import DataPrepError, RecordError, parse_record, record_from_object
from colossal_shear.data.sources import LINES, Unit, line_base, read_unit
from colossal_shear.data.tokenization import IGNORE_INDEX, TokenizedBatch, tokenize_items

WORK_FORMAT = "colossal_shear.prep-work/1"
UNIT_SCHEMA = pa.schema([("ids", pa.list_(pa.int32())), ("prefix", pa.int32()), ("category", pa.string())])
BATCH_BYTES = 4 << 20  # a tokenisation batch never carries more than this much raw text (unless one line is longer)


def work_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.work"


@dataclass(frozen=True)
class UnitJob:
    unit: Unit
    units_dir: str
    text_field: str | None
    skip_invalid: bool
    batch_lines: int


@dataclass
class UnitResult:
    index: int
    summary: dict = field(default_factory=dict)
    error: RecordError | None = None


def _unit_name(index: int) -> str:
    return f"u-{index:07d}"


def _parse_row(row: dict, file: str, number: int, text_field: str | None):
    return record_from_object(row, file, number, text_field)


def _exact(error: RecordError, unit: Unit) -> RecordError:
    """The error with the line of the file (a range that starts mid-file numbers its lines provisionally)."""
    base = line_base(unit)
    if not base:
        return error
    line = error.line + base
    message = error.args[0].replace(f"{error.file}:{error.line}: ", f"{error.file}:{line}: ", 1)
    return RecordError(message, error.reason, error.file, line)


def process_unit(job: UnitJob) -> UnitResult:
    """Worker body: read, validate and tokenise one unit, commit its documents and then its completion record. A
    bad record (without skip_invalid) comes back as `error` and commits nothing."""
    unit, units_dir = job.unit, Path(job.units_dir)
    name = _unit_name(unit.index)
    parse = (
        partial(parse_record, text_field=job.text_field)
        if unit.kind == LINES
        else partial(_parse_row, text_field=job.text_field)
    )
    tmp = units_dir / f".{name}.arrow.tmp-{socket.gethostname()}-{os.getpid()}"
    lines = records = tokens = 0
    skipped: Counter = Counter()
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, UNIT_SCHEMA) as writer:
            for items in read_unit(unit, job.batch_lines, job.text_field, BATCH_BYTES):
                batch = tokenize_items(unit.path, items, parse)
                if batch.errors:
                    if not job.skip_invalid:
                        return UnitResult(unit.index, error=_exact(batch.errors[0], unit))
                    skipped.update(e.reason for e in batch.errors)
                lines += batch.lines
                records += len(batch.categories)
                tokens += len(batch.ids)
                if batch.categories:
                    writer.write_batch(_to_arrow(batch))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, units_dir / f"{name}.arrow")
    finally:
        if tmp.exists():
            tmp.unlink()
    summary = {
        "unit": unit.index,
        "input": unit.input,
        "lines": lines,
        "records": records,
        "tokens": tokens,
        "skipped": dict(sorted(skipped.items())),
    }
    atomic_write_text(units_dir / f"{name}.json", json.dumps(summary) + "\n")
    return UnitResult(unit.index, summary)


def _to_arrow(batch: TokenizedBatch) -> pa.RecordBatch:
    offsets = np.zeros(len(batch.doc_lengths) + 1, np.int64)
    np.cumsum(batch.doc_lengths, out=offsets[1:])
    masked = (batch.labels == IGNORE_INDEX).astype(np.int32)
    prefix = np.add.reduceat(masked, offsets[:-1]) if len(masked) else np.zeros(0, np.int32)
    ids = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(batch.ids, pa.int32()))
    return pa.RecordBatch.from_arrays(
        [ids, pa.array(prefix.astype(np.int32)), pa.array(batch.categories, pa.string())], schema=UNIT_SCHEMA
    )


def _from_arrow(rb: pa.RecordBatch) -> TokenizedBatch:
    col = rb.column(0)
    offsets = col.offsets.to_numpy().astype(np.int64)
    ids = col.values.to_numpy()
    if offsets[0] != 0:
        ids = ids[offsets[0] : offsets[-1]]
        offsets = offsets - offsets[0]
    lengths = np.diff(offsets)
    prefix = rb.column(1).to_numpy().astype(np.int64)
    learn = np.repeat(np.tile(np.array([False, True]), len(lengths)), np.stack([prefix, lengths - prefix], 1).ravel())
    labels = np.where(learn, ids, np.int32(IGNORE_INDEX)).astype(np.int32)
    return TokenizedBatch(ids.astype(np.int32, copy=False), labels, lengths, rb.column(2).to_pylist())


class WorkDir:
    """The work directory of one output (see the module docstring)."""

    def __init__(self, root: Path):
        self.root = root
        self.units = root / "units"

    def done(self) -> set[int]:
        if not self.units.is_dir():
            return set()
        return {int(p.name[2:-5]) for p in self.units.iterdir() if p.name.startswith("u-") and p.name.endswith(".json")}

    def summary(self, index: int) -> dict:
        with open(self.units / f"{_unit_name(index)}.json", encoding="utf-8") as f:
            return json.load(f)

    def batches(self, index: int) -> Iterator[TokenizedBatch]:
        """The committed documents of unit `index`, batch by batch (memory-mapped)."""
        with pa.memory_map(str(self.units / f"{_unit_name(index)}.arrow")) as source:
            for rb in pa.ipc.open_stream(source):
                yield _from_arrow(rb)

    def open(self, state: dict, overwrite: bool, sharded: bool) -> set[int]:
        """Create the work directory for `state`, or reopen the one a run with the same state left: the units
        done. A work directory of another run is refused, naming what differs; with `overwrite` (and not sharded:
        another host may be using it) it is discarded instead."""
        old = self._read_state()
        if old is not None and old != state:
            if overwrite and not sharded:
                self.remove()
                old = None
            else:
                raise DataPrepError(
                    f"{self.root} holds the work of another run ({describe_changes(old, state)}): "
                    "rerun that run's command to resume it, or "
                    + ("remove that directory" if sharded else "pass --overwrite to discard it")
                    + " to start this one"
                )
        self.root.mkdir(parents=True, exist_ok=True)
        if old is None:
            self._create_state(state)
        self.units.mkdir(exist_ok=True)
        return self.done()

    def _read_state(self) -> dict | None:
        path = self.root / "state.json"
        if not path.is_file():
            if self.root.exists() and any(p.name != "units" for p in self.root.iterdir()):
                raise DataPrepError(
                    f"{self.root} exists but was not made by data preparation (no state.json): move it away"
                )
            return None
        try:
            with open(path, encoding="utf-8") as f:
                state = json.load(f)
        except (OSError, ValueError) as e:
            raise DataPrepError(f"{path}: unreadable ({e}): remove {self.root} to start over") from None
        return state if isinstance(state, dict) else {}

    def _create_state(self, state: dict) -> None:
        """Write state.json once: if another host wrote it first, theirs must be the same."""
        tmp = self.root / f".state.json.tmp-{socket.gethostname()}-{os.getpid()}"
        atomic_write_text(tmp, json.dumps(state, indent=1, sort_keys=True) + "\n")
        try:
            os.link(tmp, self.root / "state.json")
        except FileExistsError:
            other = self._read_state()
            if other != state:
                raise DataPrepError(
                    f"{self.root}: another host started a different run ({describe_changes(other or {}, state)})"
                ) from None
        finally:
            tmp.unlink()

    def fail(self, shard: int, message: str) -> None:
        atomic_write_text(self.root / f"failed-shard-{shard}.txt", message + "\n")

    def wait_for(self, total: int, poll: float = 1.0, say=None) -> None:
        """Block until every unit of the plan is done; raise when a shard recorded a failure."""
        last = 0.0
        while True:
            n = len(self.done())
            failed = sorted(self.root.glob("failed-shard-*.txt"))
            if failed:
                raise DataPrepError(f"{failed[0].stem}: {failed[0].read_text(encoding='utf-8').strip()}")
            if n >= total:
                return
            if say is not None and time.monotonic() - last > 30:
                say(f"waiting for the other shards: {n} of {total} units done")
                last = time.monotonic()
            time.sleep(poll)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def remove_temporaries(self, build: bool, sharded: bool) -> None:
        """What an interrupted run leaves that no rerun uses: the build directory (`build`: this process was
        building; pass 2's spill and parts) and unit files cut short: in a run of its own, every partial file
        (its workers are gone); in a sharded run, only those of this host's workers that are gone (other hosts'
        workers may be writing theirs)."""
        if build:
            shutil.rmtree(self.root / "build", ignore_errors=True)
        if not self.units.is_dir():
            return
        done = self.done()
        for path in self.units.iterdir():
            if sharded:
                if path.name.startswith(".u-") and f".tmp-{socket.gethostname()}-" in path.name:
                    if not _alive(path.name.rsplit("-", 1)[1]):
                        path.unlink(missing_ok=True)
            elif path.name.startswith(".") or (path.suffix == ".arrow" and int(path.name[2:9]) not in done):
                path.unlink(missing_ok=True)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (ValueError, OSError):  # not a pid of ours, or a process we may not signal: leave its file
        return True
    return True


def describe_changes(old: dict, new: dict) -> str:
    """What differs between two states, in words: settings by name with both values, the tokenizer, input files."""
    out = []
    if old.get("format") != new.get("format"):
        return f"work format {old.get('format')!r}, this run {new.get('format')!r}"
    o, n = old.get("settings", {}), new.get("settings", {})
    out += [f"{k} was {o.get(k)!r}, now {n.get(k)!r}" for k in sorted(set(o) | set(n)) if o.get(k) != n.get(k)]
    if old.get("tokenizer") != new.get("tokenizer"):
        out.append(f"the tokenizer changed (hash {str(old.get('tokenizer'))[:12]} -> {str(new.get('tokenizer'))[:12]})")
    of = {f[0]: f[1:] for f in old.get("files", [])}
    nf = {f[0]: f[1:] for f in new.get("files", [])}
    out += [f"input {p} is new" for p in nf if p not in of]
    out += [f"input {p} is gone" for p in of if p not in nf]
    out += [
        f"input {p} changed (size {of[p][0]} -> {nf[p][0]} bytes, modified "
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(nf[p][1] / 1e9))})"
        for p in nf
        if p in of and of[p] != nf[p]
    ]
    if not out and old.get("plan") != new.get("plan"):
        out.append("the units differ")
    if len(out) > 4:
        out = out[:4] + [f"and {len(out) - 4} more"]
    return "; ".join(out) or "unknown difference"
