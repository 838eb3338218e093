"""prune.py's options (`OneShotConfig`). Light on purpose (no torch), like every CLI's config module."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from colossal_shear.core.config import option
from colossal_shear.core.constants import DTYPE_NAMES

METHODS = ("importance", "depth", "random")


@dataclass
class OneShotConfig:
    """One-shot structured pruning of a Hugging Face decoder of a supported family to a target shape (no training):
    importance (Minitron activations for width, block influence for depth), depth (whole layers) or random."""

    method: str = option(help="how to choose what to keep", choices=METHODS)
    pretrained: Path = option(help="source Hugging Face model directory")
    output_dir: Path = option(help="where to write the pruned model")
    target_shape: str | None = option(
        None,
        "'hidden,heads,layers,intermediate[,kv_heads]' or a config.json / model "
        "directory with the target's sizes (optional for --method depth with "
        "--keep_layers)",
    )
    calibration_dataset: Path | None = option(
        None, "JSONL records (see docs/data_prep.md) or a data_prep output directory", default_text="the bundled corpus"
    )
    num_calibration_samples: int = option(512, "calibration sequences")
    calibration_length: int = option(512, "tokens per calibration sequence")
    calibration_batch_size: int = option(8, "sequences per forward")
    keep_layers: list[int] | None = option(None, "--method depth: indices of the layers to keep (e.g. 0,1,5)", sep=",")
    match_params: bool = option(
        False,
        "--method depth with a --target_shape narrower than the source: keep the source's width and as many layers "
        "as bring the parameter count closest to the target's",
    )
    seed: int = option(0, "seed of --method random")
    overwrite: bool = option(False, "replace an existing output directory")
    dtype: str | None = option(
        None, "load, score and save in this dtype", choices=sorted(DTYPE_NAMES), default_text="the checkpoint's"
    )
    device: str | None = option(None, "torch device for calibration", default_text="cuda if available, else cpu")
