"""Data preparation: JSONL records -> packed, loss-masked, bucketed Arrow parts with a manifest.

    from colossal_shear.data import PrepareConfig, prepare_dataset
    manifest = prepare_dataset(PrepareConfig(["data/"], "tokenizer/", "prepared/", max_length=4096))

See docs/data_prep.md for the output format and the contract with the trainer.
"""

from colossal_shear.data.config import PrepareConfig, default_num_proc
from colossal_shear.data.manifest import part_paths, read_manifest, tokenizer_fingerprint
from colossal_shear.data.prepare import prepare_dataset
from colossal_shear.data.records import DataPrepError, RecordError
from colossal_shear.data.tokenization import IGNORE_INDEX, padding_id

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
