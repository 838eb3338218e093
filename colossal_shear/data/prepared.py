"""Opening prepared datasets for training: resolve paths to parts in bucket order, and check each against the
tokenizer the model uses (a dataset tokenised with another vocabulary is refused before training starts)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from colossal_shear.data.manifest import (
    MANIFEST_NAME,
    DatasetMismatch,
    dataset_fingerprint,
    read_manifest,
    tokenizer_fingerprint,
)

__all__ = ["DatasetMismatch", "PreparedData", "open_prepared"]


@dataclass
class PreparedData:
    dataset: object  # datasets.Dataset: the parts concatenated in order
    part_sizes: list
    max_length: int
    categories: list
    fingerprint: dict | None = None  # manifest.dataset_fingerprint: what a checkpoint records and resuming compares


def _parts_of(path: Path) -> tuple[list[Path], Path]:
    if (path / MANIFEST_NAME).is_file():  # a data-prep output directory: all its parts, in order
        manifest = read_manifest(path)
        return [path / "arrow" / part["name"] for part in manifest["parts"]], path
    if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():  # one part: out/arrow/part-k
        root = path.parent.parent
        if not (root / MANIFEST_NAME).is_file():
            raise DatasetMismatch(f"{path}: a dataset part without its {MANIFEST_NAME} at {root}")
        return [path], root
    raise FileNotFoundError(f"--dataset {path}: not a prepared dataset (no {MANIFEST_NAME}, not an Arrow part)")


def open_prepared(paths, tokenizer, max_length: int | None = None, model_positions: int | None = None) -> PreparedData:
    from datasets import concatenate_datasets, load_from_disk

    expected = tokenizer_fingerprint(tokenizer)
    parts, lengths, categories, roots, all_dirs = [], set(), [], [], []
    for raw in paths:
        part_dirs, root = _parts_of(Path(os.path.expanduser(raw)))
        roots.append(root)
        all_dirs.extend(part_dirs)
        manifest = read_manifest(root)
        got = manifest["tokenizer"]
        if got["hash"] != expected["hash"] or got["vocab_size"] != expected["vocab_size"]:
            raise DatasetMismatch(
                f"{root}: prepared with tokenizer {got['name']!r} (vocab {got['vocab_size']}, "
                f"hash {got['hash'][:12]}), "
                f"but the model's tokenizer is {expected['name']!r} (vocab {expected['vocab_size']}, hash "
                f"{expected['hash'][:12]}): re-run data_prep with the model's tokenizer"
            )
        lengths.add(int(manifest["max_length"]))
        for part in manifest["parts"]:
            for c in part["categories"]:
                if c not in categories:
                    categories.append(c)
        parts.extend(load_from_disk(str(p)) for p in part_dirs)
    if len(lengths) != 1:
        raise DatasetMismatch(f"the datasets were packed to different lengths {sorted(lengths)}: use one max_length")
    packed = lengths.pop()
    if max_length is not None and max_length != packed:
        raise DatasetMismatch(
            f"--max_length {max_length} differs from the dataset's packed length {packed}: "
            "re-run data_prep with --max_length to change it (sequences are never truncated)"
        )
    if model_positions is not None and packed > model_positions:
        raise DatasetMismatch(
            f"sequence length {packed} is larger than the model's {model_positions} positions (max_position_embeddings)"
        )
    parts = [p for p in parts if len(p)]
    if not parts:
        raise DatasetMismatch(f"{', '.join(map(str, paths))}: no sequences")
    dataset = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return PreparedData(dataset, [len(p) for p in parts], packed, categories, dataset_fingerprint(roots, all_dirs))
