"""`id_map.json`: old token id -> new token id, written beside every tokenizer this package produces.

A flat JSON object {"<old id>": <new id>} over the kept old ids, in old-id order. Target ids that are not values of
the map are new pieces. `init_model.py` selects embedding rows through it (pruning) and initialises the rest.
"""

from __future__ import annotations

from pathlib import Path

from colossal_shear.core.constants import ID_MAP_FILE
from colossal_shear.core.errors import VocabError
from colossal_shear.vocab.common import read_json, write_json


def write_id_map(directory: Path, id_map: dict[int, int]) -> Path:
    path = Path(directory) / ID_MAP_FILE
    write_json(path, {str(k): int(id_map[k]) for k in sorted(id_map)}, indent=None)
    return path


def read_id_map(path: Path) -> dict[int, int]:
    path = Path(path)
    raw = read_json(path, ID_MAP_FILE)
    if not isinstance(raw, dict):
        raise VocabError(f"{path}: expected a JSON object mapping old ids to new ids")
    out: dict[int, int] = {}
    for k, v in raw.items():
        try:
            old = int(k)
        except ValueError:
            raise VocabError(f"{path}: key {k!r} is not a token id") from None
        if not isinstance(v, int) or isinstance(v, bool) or v < 0 or old < 0:
            raise VocabError(f"{path}: entry {k!r}: {v!r} is not a valid token id")
        out[old] = v
    if len(set(out.values())) != len(out):
        raise VocabError(f"{path}: two old ids map to the same new id")
    return out
