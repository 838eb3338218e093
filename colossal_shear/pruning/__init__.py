"""Structured pruning of LLaMA-style Hugging Face models: hard-concrete L0 masks and their Lagrangian (Sheared-LLaMA),
masks applied to the standard HF model through hooks, folding into a smaller plain HF model, one-shot importance /
depth / random pruning (Minitron, OpenBA-V2). See docs/pruning.md."""

from colossal_shear.pruning.fold import fold, save_folded
from colossal_shear.pruning.hard_concrete import HardConcrete
from colossal_shear.pruning.lagrangian import Lagrangian
from colossal_shear.pruning.masked_model import MaskedModel
from colossal_shear.pruning.masks import KINDS, PruningMasks
from colossal_shear.pruning.oneshot import depth_masks, importance_masks, random_masks
from colossal_shear.pruning.shape import PruneShape

__all__ = [
    "KINDS",
    "HardConcrete",
    "Lagrangian",
    "MaskedModel",
    "PruneShape",
    "PruningMasks",
    "depth_masks",
    "fold",
    "importance_masks",
    "random_masks",
    "save_folded",
]
