"""The manifest that travels with a prepared dataset, and the tokenizer fingerprint that ties it to a tokenizer.

Data preparation and the trainer both call `tokenizer_fingerprint`: a dataset tokenised with one vocabulary and
trained with another is silent garbage, so the trainer compares the `hash` recorded here with its own tokenizer's.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from colossal_shear.core.errors import UserError
from colossal_shear.core.fsutil import outside, sampled_fingerprint

MANIFEST_NAME = "manifest.json"
FORMAT = "colossal_shear.packed/1"


class DatasetMismatch(UserError, ValueError):
    """A prepared dataset that cannot be used as given: another tokenizer or length, or a damaged manifest."""


def tokenizer_fingerprint(tokenizer) -> dict:
    """{'name', 'vocab_size', 'hash'} for a Hugging Face tokenizer (slow or fast).

    `hash` is a sha256 over every token string in id order (0 .. len(tokenizer) - 1, added tokens included) and the
    BOS/EOS/UNK/PAD ids, serialised as JSON: no Python `hash()`, so it is stable across processes and machines.
    `name` (the path or hub id it was loaded from) is informational only; compare `hash`.
    """
    n = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = {k: getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "unk", "pad")}
    payload = json.dumps({"tokens": tokens, "special": special}, ensure_ascii=False, separators=(",", ":"))
    return {
        "name": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        "vocab_size": n,
        "hash": hashlib.sha256(payload.encode("utf-8")).hexdigest(),
    }


def manifest_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p / MANIFEST_NAME if p.is_dir() else p


def read_manifest(path: str | os.PathLike) -> dict:
    """Load the manifest of a prepared dataset; `path` is the output directory or the manifest file itself."""
    p = manifest_path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} at {p}: not a directory written by data_prep/prepare_pretrain_dataset.py"
        )
    with open(p, encoding="utf-8") as f:
        manifest = json.load(f)
    if not isinstance(manifest, dict) or "parts" not in manifest or "tokenizer" not in manifest:
        raise DatasetMismatch(f"{p}: not a data-prep manifest (missing 'parts' or 'tokenizer')")
    if manifest.get("format") != FORMAT:
        raise DatasetMismatch(f"{p}: manifest format {manifest.get('format')!r}, expected {FORMAT!r}")
    for part in manifest["parts"]:  # a part is a directory of arrow/, named by a plain name
        name = part.get("name") if isinstance(part, dict) else None
        why = outside(p.parent / "arrow", name) or (None if Path(str(name)).name == name else "is not a plain name")
        if why:
            raise DatasetMismatch(f"{p}: part name {name!r} {why}: refused like a corrupted manifest")
    return manifest


def part_paths(output_dir: str | os.PathLike) -> list[Path]:
    """The Arrow part directories of a prepared dataset, in bucket order (load each with `datasets.load_from_disk`)."""
    root = Path(output_dir)
    return [root / "arrow" / part["name"] for part in read_manifest(root)["parts"]]


def dataset_fingerprint(roots: list[Path], part_dirs: list[Path]) -> dict:
    """What a run trains on, in order: each dataset's manifest (tokenizer, length, seed, parts and their sizes), the
    parts in the order given, and a sampled fingerprint of their Arrow files (the sequences and their order inside
    each part). {'hash', 'seeds', 'parts'}: the hash decides, the rest names what differs."""
    h = hashlib.sha256()
    seeds = []
    for root in roots:
        h.update(manifest_path(root).read_bytes())
        seeds.append(read_manifest(root).get("seed"))
    for d in part_dirs:
        h.update(sampled_fingerprint(d, sorted(d.glob("*.arrow"))).encode())
    return {"hash": h.hexdigest(), "seeds": seeds, "parts": [f"{d.parent.parent.name}/{d.name}" for d in part_dirs]}


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    p = directory / MANIFEST_NAME
    with open(p, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return p
