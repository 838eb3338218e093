"""`prepare_dataset`: records -> packed, loss-masked, bucketed Arrow parts + manifest.json, with nothing lost.

The inputs are cut into fixed units (colossal_shear.data.sources). Pass 1 tokenises the units in worker processes;
each unit's documents are committed to the work directory with a completion record (colossal_shear.data.work), so a
rerun after a crash resumes with the units left, and hosts of a sharded run each take unit i with
i mod num_shards == shard. The run that merges (the only one on one host; shard 0 under a launcher) reads the units
in order, packs each category's documents and spills finished sequences to per-category Arrow files. Pass 2 counts
sequences per category, assigns them to bins with the seed and writes part k = bin k of every category. The output
is built inside the work directory and renamed into place only when complete; the work directory is then removed.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from colossal_shear.core.errors import DiskFullError, is_disk_full
from colossal_shear.core.fsutil import disk_full, human_bytes, publish_dir, tree_bytes
from colossal_shear.core.interrupt import Interrupted
from colossal_shear.core.logger import HERE, PROGRESS, get_logger
from colossal_shear.data.arrow_io import OUTPUT_COLUMNS, PartStats, SpillStore, part_chunks, write_part
from colossal_shear.data.buckets import assign_bins, num_parts, part_rows
from colossal_shear.data.config import PrepareConfig
from colossal_shear.data.manifest import FORMAT, tokenizer_fingerprint, write_manifest
from colossal_shear.data.packing import CategoryPacker
from colossal_shear.data.records import DataPrepError, LineReader, discover_inputs
from colossal_shear.data.sources import plan
from colossal_shear.data.tokenization import (
    DocumentTokenizer,
    OrderedPool,
    init_worker,
    load_tokenizer,
    padding_id,
    set_worker_tokenizer,
)
from colossal_shear.data.work import WORK_FORMAT, UnitJob, WorkDir, process_unit, work_dir_for

log = get_logger(__name__)

BATCH_BYTES = 4 << 20  # a tokenisation task never carries more than this much raw text (unless one line is longer)
WRITE_CHUNK_ROWS = 512  # sequences gathered per write in pass 2


def say(message: str) -> None:
    """One status line on stderr (resume, shards), from whichever process (host, shard) it concerns."""
    log.info(f"prepare_dataset: {message}", extra={**HERE, **PROGRESS})


def _check_output(out: Path, overwrite: bool, inputs: list[Path]) -> None:
    if out.exists() and not out.is_dir():
        raise DataPrepError(f"{out}: output path exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DataPrepError(f"{out}: output directory exists and is not empty; pass --overwrite to replace it")
        resolved = out.resolve()
        for f in inputs:
            if resolved in f.resolve().parents:
                raise DataPrepError(
                    f"{f}: input file is inside the output directory {out}, which --overwrite would delete"
                )


def _line_batches(files: list[Path], batch_lines: int) -> Iterator[tuple[tuple, tuple]]:
    """((file, [(line number, raw bytes)...]), (file index, bytes read so far)) batches of JSONL files, read lazily
    (for tests that feed `tokenize_lines` directly)."""
    done = 0
    for index, path in enumerate(files):
        name = str(path)
        with LineReader(path) as reader:
            batch, size = [], 0
            for number, raw in reader:
                batch.append((number, raw))
                size += len(raw)
                if len(batch) >= batch_lines or size >= BATCH_BYTES:
                    yield (name, batch), (index, done + reader.position)
                    batch, size = [], 0
            if batch:
                yield (name, batch), (index, done + reader.position)
            done += path.stat().st_size


def _progress(enabled: bool, **kw):
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, dynamic_ncols=True, **kw)


def _load(config: PrepareConfig):
    tok_path = Path(config.tokenizer_dir).expanduser()
    if not tok_path.exists() and (os.sep in config.tokenizer_dir or config.tokenizer_dir.startswith(".")):
        raise DataPrepError(f"{config.tokenizer_dir}: tokenizer directory does not exist")
    try:
        tokenizer = load_tokenizer(config.tokenizer_dir)
    except (OSError, ValueError) as e:
        raise DataPrepError(f"cannot load a tokenizer from {config.tokenizer_dir}: {e}") from e
    return tokenizer, DocumentTokenizer(tokenizer)  # raises when there is no EOS


def prepare_dataset(config: PrepareConfig) -> dict | None:
    """Run data preparation; return the manifest (also written to <output>/manifest.json), or None from a shard
    that does not merge."""
    out = Path(config.data_output_dirs).expanduser()
    files = discover_inputs(config.data_input_dirs)
    _check_output(out, config.overwrite, files)
    tokenizer, doc_tokenizer = _load(config)
    fingerprint = tokenizer_fingerprint(tokenizer)
    entries, units = plan(files, config.unit_bytes, config.text_field)
    shard, shards = config.shard()
    work = WorkDir(work_dir_for(out))
    state = {
        "format": WORK_FORMAT,
        "settings": config.settings(),
        "tokenizer": fingerprint["hash"],
        "files": [f for e in entries for f in e.fingerprint()],
        "plan": [[u.path, u.start, u.end] for u in units],
    }
    done = work.open(state, config.overwrite, sharded=shards > 1)
    mine = [u for u in units if u.index % shards == shard]
    todo = [u for u in mine if u.index not in done]
    if len(todo) < len(mine):
        say(
            f"resuming from {work.root}: {len(mine) - len(todo)} of {len(mine)} units already done, {len(todo)} left"
            + (f" (shard {shard} of {shards})" if shards > 1 else "")
        )
    builds = shards == 1 or (shard == 0 and config.merge_shards)
    try:
        if shards > 1:
            _tokenize(config, work, todo, doc_tokenizer, sum(u.size for u in todo))
            if not builds:
                say(
                    f"shard {shard} of {shards} done ({len(mine)} of {len(units)} units); when every shard is done, "
                    "the same command without --shard_index/--num_shards merges them"
                )
                return None
            work.wait_for(len(units), say=say)
            todo = []
        manifest = _build(config, out, work, entries, units, todo, tokenizer, doc_tokenizer, fingerprint)
    except DataPrepError as e:
        if shards > 1:
            work.fail(shard, str(e))
            e.rank_local = True  # this shard's own: the CLI prints it on this rank
        else:  # the same command would meet the same error, and a changed input is refused on resume
            work.remove()
        raise
    except Interrupted as e:
        e.note = _stopped(work, len(units), builds, shards > 1)
        raise
    except Exception as e:
        if not is_disk_full(e):
            raise
        kept = []
        error = disk_full(
            e, f"preparing {out}", work.root, lambda: kept.append(_stopped(work, len(units), builds, shards > 1))
        )
        raise DiskFullError(f"{error}; {kept[0]}") from None
    work.remove()
    log.debug("wrote %d sequences in %d parts to %s", manifest["totals"]["sequences"], len(manifest["parts"]), out)
    return manifest


def _stopped(work: WorkDir, total: int, builds: bool, sharded: bool) -> str:
    """After an interruption or a full disk: remove what no rerun can use (the build directory, when this process
    builds; unit files cut short), keep the committed units for the rerun to resume; say which."""
    work.remove_temporaries(builds, sharded)
    done = len(work.done())
    if done == 0 and not sharded:
        work.remove()
        return f"no unit was complete; {work.root} is removed"
    return (
        f"the {done} of {total} units done are kept in {work.root} ({human_bytes(tree_bytes(work.root))}): rerun the "
        "same command to resume" + ("" if sharded else ", or remove that directory")
    )


def _unit_results(config: PrepareConfig, work: WorkDir, todo, doc_tokenizer, pool: OrderedPool) -> Iterator:
    jobs = ((UnitJob(u, str(work.units), config.text_field, config.skip_invalid, config.batch_lines), u) for u in todo)
    for result, unit in pool.map(jobs):
        if result.error is not None:
            raise result.error
        yield unit


def _tokenize(config: PrepareConfig, work: WorkDir, todo, doc_tokenizer, total: int) -> None:
    """A shard's pass 1 without packing: tokenise and commit its units."""
    set_worker_tokenizer(doc_tokenizer)
    try:
        with (
            OrderedPool(process_unit, config.num_proc, init_worker, (config.tokenizer_dir,)) as pool,
            _progress(config.progress, total=total, unit="B", unit_scale=True, desc="tokenise") as bar,
        ):
            for unit in _unit_results(config, work, todo, doc_tokenizer, pool):
                bar.update(unit.size)
    finally:
        set_worker_tokenizer(None)


def _build(config, out: Path, work: WorkDir, entries, units, todo, tokenizer, doc_tokenizer, fingerprint) -> dict:
    build = work.root / "build"
    shutil.rmtree(build, ignore_errors=True)  # what a crash during an earlier build left
    build.mkdir()
    manifest = _run(config, work, entries, units, todo, tokenizer, doc_tokenizer, fingerprint, build)
    publish_dir(build, out, config.overwrite)
    return manifest


def _pass1(config, work: WorkDir, entries, units, todo, doc_tokenizer, spill: SpillStore, pad_id: int):
    """Pack every unit's documents in unit order, tokenising the units not done yet on the way."""
    packers: dict[str, CategoryPacker] = {}
    skipped: Counter = Counter()
    per_file = [{"path": e.path, "lines": 0, "records": 0} for e in entries]
    set_worker_tokenizer(doc_tokenizer)  # inherited by forked workers; spawned ones load it from tokenizer_dir
    try:
        with (
            OrderedPool(process_unit, config.num_proc, init_worker, (config.tokenizer_dir,)) as pool,
            _progress(
                config.progress, total=sum(u.size for u in units), unit="B", unit_scale=True, desc="tokenise+pack"
            ) as bar,
        ):
            fresh = _unit_results(config, work, todo, doc_tokenizer, pool)
            pending = {u.index for u in todo}
            for unit in units:
                if unit.index in pending:
                    next(fresh)
                summary = work.summary(unit.index)
                per_file[unit.input]["lines"] += summary["lines"]
                per_file[unit.input]["records"] += summary["records"]
                skipped.update(summary["skipped"])
                for batch in work.batches(unit.index):
                    _pack(batch, packers, spill, config.max_length, pad_id)
                bar.update(unit.size)
    finally:
        set_worker_tokenizer(None)
    for cat in sorted(packers):
        spill.add(cat, packers[cat].finish())
    spill.close()
    return per_file, skipped


def _run(config, work, entries, units, todo, tokenizer, doc_tokenizer, fingerprint, tmp: Path) -> dict:
    pad_id = padding_id(tokenizer)
    spill = SpillStore(tmp / ".spill", config.buffer_size)
    per_file, skipped = _pass1(config, work, entries, units, todo, doc_tokenizer, spill, pad_id)
    counts = dict(sorted(spill.counts.items()))
    if not counts:
        why = f" (skipped: {dict(skipped)})" if skipped else ""
        raise DataPrepError(f"no documents in the input {', '.join(e.path for e in entries)}{why}")

    categories = list(counts)
    parts = num_parts(counts, config.num_spliced_dataset_bins)
    bins = assign_bins(counts, parts, config.seed)
    tables = {c: spill.table(c) for c in categories}
    (tmp / "arrow").mkdir()
    if config.write_jsonl:
        (tmp / "jsonl").mkdir()
    part_entries = []
    import datasets

    bars_were_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        bar = _progress(config.progress, total=sum(counts.values()), unit="seq", desc="write parts")
        for k in range(parts):
            name = f"part-{k:05d}"
            codes, rows = part_rows(bins, categories, k, config.seed)
            stats = PartStats()
            chunks = part_chunks(tables, categories, codes, rows, WRITE_CHUNK_ROWS, stats)
            n = write_part(
                tmp / "arrow" / name,
                tmp / ".spill" / f"{name}.arrow",
                chunks,
                tmp / "jsonl" / f"{name}.jsonl" if config.write_jsonl else None,
            )
            part_entries.append({"name": name, "sequences": n, "categories": dict(sorted(stats.categories.items()))})
            bar.update(n)
        bar.close()
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()
    del tables
    shutil.rmtree(tmp / ".spill")

    manifest = _manifest(config, fingerprint, tokenizer, pad_id, per_file, part_entries, skipped)
    write_manifest(tmp, manifest)
    return manifest


def _pack(batch, packers: dict[str, CategoryPacker], spill: SpillStore, max_length: int, pad_id: int) -> None:
    """Feed each run of consecutive same-category documents to that category's packer, in input order."""
    cats = batch.categories
    if not cats:
        return
    offsets = [0]
    for n in batch.doc_lengths.tolist():
        offsets.append(offsets[-1] + n)
    start = 0
    for i in range(1, len(cats) + 1):
        if i == len(cats) or cats[i] != cats[start]:
            cat = cats[start]
            packer = packers.get(cat)
            if packer is None:
                packer = packers[cat] = CategoryPacker(max_length, pad_id)
            lo, hi = offsets[start], offsets[i]
            spill.add(cat, packer.add(batch.ids[lo:hi], batch.labels[lo:hi], batch.doc_lengths[start:i]))
            start = i


def _manifest(config: PrepareConfig, fingerprint, tokenizer, pad_id, per_file, parts, skipped) -> dict:
    keys = ("sequences", "tokens", "loss_tokens", "documents", "segments")
    by_cat: dict[str, dict[str, int]] = {}
    for part in parts:
        for cat, s in part["categories"].items():
            acc = by_cat.setdefault(cat, dict.fromkeys(keys, 0))
            for k in keys:
                acc[k] += s[k]
    totals = {k: sum(c[k] for c in by_cat.values()) for k in keys}
    totals["padding_tokens"] = totals["sequences"] * config.max_length - totals["tokens"]
    totals["records"] = sum(f["records"] for f in per_file)
    totals["skipped"] = sum(skipped.values())
    return {
        "format": FORMAT,
        "tokenizer": fingerprint,
        "special_tokens": {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": pad_id,
        },
        "max_length": config.max_length,
        "num_spliced_dataset_bins": config.num_spliced_dataset_bins,
        "seed": config.seed,
        "command": config.command_line(),
        "columns": list(OUTPUT_COLUMNS),
        "inputs": per_file,
        "parts": parts,
        "categories": dict(sorted(by_cat.items())),
        "totals": totals,
        "skipped": dict(sorted(skipped.items())),
    }
