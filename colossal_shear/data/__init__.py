"""Data preparation: JSONL records -> packed, loss-masked, bucketed Arrow parts with a manifest.

    from colossal_shear.data import PrepareConfig, prepare_dataset
    manifest = prepare_dataset(PrepareConfig(["data/"], "tokenizer/", "prepared/", max_length=4096))

See docs/data_prep.md for the output format and the contract with the trainer.
"""

from .config import PrepareConfig, default_num_proc
from .manifest import read_manifest, part_paths, tokenizer_fingerprint
from .prepare import prepare_dataset
from .records import DataPrepError, RecordError
from .tokenization import IGNORE_INDEX, padding_id

__all__ = [
    "PrepareConfig",
    "prepare_dataset",
    "read_manifest",
    "part_paths",
    "tokenizer_fingerprint",
    "padding_id",
    "DataPrepError",
    "RecordError",
    "IGNORE_INDEX",
    "default_num_proc",
]
