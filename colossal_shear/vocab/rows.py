"""`new_rows.json`: which rows of a resized model's embeddings / LM head are new, written by init_model.py.

Why: the align stage can train only the rows a vocabulary expansion added (`train.py --train_embeddings new`) and
must know, without the source model, which rows to keep frozen. The file lives next to `config.json`:

    {"format": 1, "vocab_size": 49216, "tokenizer_size": 69001, "source_rows": 49152, "init": "calibrated",
     "old_rows": [[0, 49152]], "new_rows": [[49152, 69001]], "padding_rows": [[69001, 69056]]}

Row sets are lists of half-open [start, stop) ranges. `old_rows` are the rows copied from the source (bit for bit);
`new_rows` the new tokenizer pieces; `padding_rows` the rows past the tokenizer (pad_to_multiple_of). For a model
directory without the file, the old rows are the values of `id_map.json` (written by init_tokenizer.py and copied
into the model directory by init_model.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from colossal_shear.core.errors import VocabError
from colossal_shear.vocab.id_map import ID_MAP_FILE, read_id_map

NEW_ROWS_FILE = "new_rows.json"


def to_ranges(ids) -> list[list[int]]:
    """Sorted ids -> [[start, stop), ...] (vectorised)."""
    t = torch.as_tensor(
        sorted(set(int(i) for i in ids)) if not torch.is_tensor(ids) else torch.unique(ids), dtype=torch.long
    )
    if t.numel() == 0:
        return []
    breaks = torch.nonzero(t[1:] != t[:-1] + 1).squeeze(1) + 1
    starts = torch.cat([t[:1], t[breaks]])
    stops = torch.cat([t[breaks - 1], t[-1:]]) + 1
    return [[int(a), int(b)] for a, b in zip(starts.tolist(), stops.tolist())]


def from_ranges(ranges) -> torch.Tensor:
    if not ranges:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(int(a), int(b)) for a, b in ranges])


def write_new_rows(model_dir: Path, plan, init: str) -> Path:
    path = Path(model_dir) / NEW_ROWS_FILE
    data = {
        "format": 1,
        "vocab_size": plan.padded_size,
        "tokenizer_size": plan.tokenizer_size,
        "source_rows": plan.source_rows,
        "init": init,
        "old_rows": to_ranges(plan.copy_dst),
        "new_rows": to_ranges(plan.new_ids),
        "padding_rows": [[plan.tokenizer_size, plan.padded_size]] if plan.padding else [],
    }
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return path


def old_rows(model_dir: Path, vocab_size: int) -> torch.Tensor:
    """The rows a resized model copied from its source (frozen by `--train_embeddings new`), from new_rows.json
    or, failing that, id_map.json. Errors say what is missing."""
    model_dir = Path(model_dir)
    path = model_dir / NEW_ROWS_FILE
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            rows, size = from_ranges(data["old_rows"]), int(data["vocab_size"])
        except (ValueError, KeyError, TypeError) as e:
            raise VocabError(f"{path}: not a valid {NEW_ROWS_FILE} ({e})") from None
        if size != vocab_size:
            raise VocabError(
                f"{path} describes {size} rows but the model has {vocab_size}: was the model resized "
                "again after init_model.py?"
            )
    elif (model_dir / ID_MAP_FILE).is_file():
        rows = torch.tensor(sorted(read_id_map(model_dir / ID_MAP_FILE).values()), dtype=torch.long)
    else:
        raise VocabError(
            f"{model_dir} has neither {NEW_ROWS_FILE} nor {ID_MAP_FILE}: only a model resized by "
            "tokenizer/init_model.py says which embedding rows are new"
        )
    if len(rows) and int(rows.max()) >= vocab_size:
        raise VocabError(f"{model_dir}: old row {int(rows.max())} is past the model's {vocab_size} rows")
    return rows
