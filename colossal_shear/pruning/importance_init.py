"""Importance-initialised masks: Minitron activation importance orders the initial log_alpha of the L0 masks.

With a constant init every unit starts equal and the masks must discover which to drop from noisy gradients;
here the units the calibration activations rank lowest start lowest, so the masks start already ordered the way
one-shot importance pruning would cut. Each pruned kind's scores are ranked within their row (per layer for heads,
groups and neurons; over all units for hidden channels and layers) and mapped linearly to
[mask_init - spread, mask_init + spread] (the most important unit at the top).
"""

from __future__ import annotations

import torch

from colossal_shear.pruning.masks import PruningMasks
from colossal_shear.pruning.oneshot import calibration_batches, collect_importance, group_scores

CALIBRATION_SAMPLES = 64
CALIBRATION_LENGTH = 256


def _rank01(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each entry within its last dim, scaled to [0, 1] (0 = least important; ties: the lower index)."""
    n = scores.shape[-1]
    order = torch.argsort(scores.float(), dim=-1, stable=True)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=order.device).expand_as(order))
    return ranks.float() / max(1, n - 1)


@torch.no_grad()
def importance_log_alpha(masks: PruningMasks, model, dataset_dir: str, mask_init: float, spread: float) -> dict:
    """Set the learnable gates' log_alpha from activation importance on the first sequences of a prepared dataset
    (identical on every rank: same model, same data). Returns the scores used."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    batches = calibration_batches(tokenizer, dataset_dir, CALIBRATION_SAMPLES, CALIBRATION_LENGTH)
    scores = collect_importance(model, batches, want_width=True, want_depth="layer" in masks.pruned)
    scores["group"] = group_scores(scores["head"], masks.source)
    for kind in masks.pruned:
        gate = masks.gates[kind]
        gate.log_alpha.copy_(mask_init + spread * (2 * _rank01(scores[kind]).to(gate.log_alpha.device) - 1))
    return scores
