"""Structured pruning of LLaMA-style Hugging Face models: hard-concrete L0 masks and their Lagrangian (Sheared-LLaMA),
masks applied to the standard HF model through hooks, folding into a smaller plain HF model, one-shot importance /
depth / random pruning (Minitron, OpenBA-V2) and a distillation loss. See docs/pruning.md."""

from .apply import MaskedModel
from .distill import kd_loss
from .fold import fold, save_folded
from .hard_concrete import HardConcrete
from .lagrangian import Lagrangian
from .masks import KINDS, PruningMasks
from .oneshot import depth_masks, importance_masks, random_masks
from .shape import PruneShape

__all__ = ["KINDS", "HardConcrete", "Lagrangian", "MaskedModel", "PruneShape", "PruningMasks", "depth_masks", "fold",
           "importance_masks", "kd_loss", "random_masks", "save_folded"]
