"""Feeding the trainer: this rank's micro-batches in the sampler's order, and the model inputs for a packed batch."""

from __future__ import annotations

import torch

from colossal_shear.data.collator import collate
from colossal_shear.data.sampler import BucketSampler


class Batches:
    """Micro-batches for this data-parallel rank, in the sampler's order (its state is the data position)."""

    def __init__(self, data, sampler, batch_size: int):
        self.data, self.sampler, self.batch_size = data, sampler, batch_size

    def next(self) -> dict:
        return collate(self.data.dataset[self.sampler.take(self.batch_size)])


def model_inputs(batch: dict, dtype: torch.dtype, device) -> dict:
    """Rows holding several documents carry `document_ids`, which the model's attention hook (attention.py) turns
    into the block-causal mask, FlexAttention's document mask or flash-attn's restarting positions; `dtype` is
    kept for callers (the mask takes the dtype attention computes in)."""
    inputs = {k: batch[k].to(device) for k in ("input_ids", "labels", "position_ids")}
    if int(batch["num_docs"].max()) > 1:  # packed documents must not attend to each other
        inputs["document_ids"] = batch["segment_ids"].to(device)
    return inputs


def real_tokens(batch: dict) -> int:
    """Tokens of documents (padding excluded): what throughput counts."""
    return int((batch["segment_ids"] < batch["num_docs"][:, None]).sum())


def make_sampler(cfg, data, dp_rank: int, dp_size: int, reference_losses=None):
    """Bucket order by default; with --dynamic_loading, categories drawn by weights that evaluations move.
    Returns (sampler, DomainWeights or None)."""
    if not cfg.data.dynamic_loading:
        return BucketSampler(data.part_sizes, dp_rank, dp_size, seed=cfg.seed), None
    from colossal_shear.data.domain_weights import DomainSampler, DomainWeights

    seq_categories = list(data.dataset["category"])
    counts = [seq_categories.count(c) for c in data.categories]
    weights = DomainWeights(data.categories, counts, reference_losses)
    return DomainSampler(seq_categories, weights, dp_rank, dp_size, seed=cfg.seed), weights
