"""`prepare_dataset`: JSONL -> packed, loss-masked, bucketed Arrow parts + manifest.json, with nothing lost.

Pass 1 streams the input lines through the tokenisation pool (bounded window, input order kept), packs each
category's documents and spills finished sequences to per-category Arrow files. Pass 2 counts sequences per
category, assigns them to bins with the seed and writes part k = bin k of every category. Everything is written
under a temporary sibling of the output directory, which is renamed into place only when complete: an error or an
interrupt leaves no output directory (and an existing one untouched).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from colossal_shear.core.fsutil import atomic_dir
from colossal_shear.data.arrow_io import OUTPUT_COLUMNS, PartStats, SpillStore, part_chunks, write_part
from colossal_shear.data.buckets import assign_bins, num_parts, part_rows
from colossal_shear.data.config import PrepareConfig
from colossal_shear.data.manifest import FORMAT, tokenizer_fingerprint, write_manifest
from colossal_shear.data.packing import CategoryPacker
from colossal_shear.data.records import DataPrepError, LineReader, discover_inputs
from colossal_shear.data.tokenization import (
    DocumentTokenizer,
    OrderedPool,
    init_worker,
    load_tokenizer,
    padding_id,
    set_worker_tokenizer,
    tokenize_lines,
)

logger = logging.getLogger(__name__)

BATCH_BYTES = 4 << 20  # a tokenisation task never carries more than this much raw text (unless one line is longer)
WRITE_CHUNK_ROWS = 512  # sequences gathered per write in pass 2


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
    """((file, [(line number, raw bytes)...]), (file index, bytes read so far)) batches, read lazily."""
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


def prepare_dataset(config: PrepareConfig) -> dict:
    """Run data preparation; return the manifest (also written to <output>/manifest.json)."""
    out = Path(config.data_output_dirs).expanduser()
    files = discover_inputs(config.data_input_dirs)
    _check_output(out, config.overwrite, files)

    tok_path = Path(config.tokenizer_dir).expanduser()
    if not tok_path.exists() and (os.sep in config.tokenizer_dir or config.tokenizer_dir.startswith(".")):
        raise DataPrepError(f"{config.tokenizer_dir}: tokenizer directory does not exist")
    try:
        tokenizer = load_tokenizer(config.tokenizer_dir)
    except (OSError, ValueError) as e:
        raise DataPrepError(f"cannot load a tokenizer from {config.tokenizer_dir}: {e}") from e
    doc_tokenizer = DocumentTokenizer(tokenizer)  # raises when there is no EOS
    fingerprint = tokenizer_fingerprint(tokenizer)
    pad_id = padding_id(tokenizer)

    with atomic_dir(out, config.overwrite) as tmp:
        manifest = _run(config, files, tokenizer, doc_tokenizer, fingerprint, pad_id, tmp)
    logger.info("wrote %d sequences in %d parts to %s", manifest["totals"]["sequences"], len(manifest["parts"]), out)
    return manifest


def _run(config, files, tokenizer, doc_tokenizer, fingerprint, pad_id, tmp: Path) -> dict:
    spill = SpillStore(tmp / ".spill", config.buffer_size)
    packers: dict[str, CategoryPacker] = {}
    skipped: Counter = Counter()
    per_file = [{"path": str(f), "lines": 0, "records": 0} for f in files]
    total_bytes = sum(f.stat().st_size for f in files)

    set_worker_tokenizer(doc_tokenizer)  # inherited by forked workers; spawned ones load it from tokenizer_dir
    try:
        with (
            OrderedPool(tokenize_lines, config.num_proc, init_worker, (config.tokenizer_dir,)) as pool,
            _progress(config.progress, total=total_bytes, unit="B", unit_scale=True, desc="tokenise+pack") as bar,
        ):
            seen = 0
            for batch, (index, position) in pool.map(_line_batches(files, config.batch_lines)):
                if batch.errors:
                    if not config.skip_invalid:
                        raise batch.errors[0]
                    skipped.update(e.reason for e in batch.errors)
                per_file[index]["lines"] += batch.lines
                per_file[index]["records"] += len(batch.categories)
                _pack(batch, packers, spill, config.max_length, pad_id)
                bar.update(position - seen)
                seen = position
    finally:
        set_worker_tokenizer(None)
    for cat in sorted(packers):
        spill.add(cat, packers[cat].finish())
    spill.close()

    counts = dict(sorted(spill.counts.items()))
    if not counts:
        why = f" (skipped: {dict(skipped)})" if skipped else ""
        raise DataPrepError(f"no documents in the input {', '.join(map(str, files))}{why}")

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
