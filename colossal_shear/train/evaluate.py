"""Held-out loss per category: token-weighted over each category's sequences, split over data-parallel ranks and
reduced over all ranks."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from colossal_shear.data.collator import collate
from colossal_shear.train.batches import model_inputs


@torch.no_grad()
def evaluate_losses(
    evals, batch_size: int, loss_fn: Callable, dtype, device, dp_rank: int, dp_size: int, loss_rank: bool
) -> dict:
    """`loss_fn(inputs)` gives a micro-batch's mean loss (None on ranks that do not hold it, e.g. pipeline stages
    before the last)."""
    categories = list(evals.dataset["category"])
    results = {}
    for cat in evals.categories:
        idx = [i for i, c in enumerate(categories) if c == cat]
        mine = idx[dp_rank::dp_size]
        total = [0.0, 0.0]
        # every rank runs the same number of batches so that collective ops inside the model line up
        n_batches = -(-len(idx) // (dp_size * batch_size))
        for b in range(n_batches):
            chunk = mine[b * batch_size : (b + 1) * batch_size] or idx[:batch_size]
            weight = 1.0 if b * batch_size < len(mine) else 0.0
            batch = collate(evals.dataset[chunk])
            n_labels = int((batch["labels"][:, 1:] != -100).sum())
            loss = loss_fn(model_inputs(batch, dtype, device))
            if loss is not None and loss_rank:
                total[0] += weight * float(loss) * n_labels
                total[1] += weight * n_labels
        loss_sum, count = reduce_sum(total, device)
        results[cat] = loss_sum / count if count else float("nan")
    return results


def reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
