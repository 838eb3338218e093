"""The optimizer (HybridAdam on GPU, AdamW on CPU processes) and the learning-rate schedule: linear warm-up, then cosine
decay to 10% of the peak (Colossal-LLaMA-2, TinyLlama)."""

from __future__ import annotations

import math

import torch

from colossal_shear.train.distributed.plugins import device_type


def resolve_warmup(warmup_steps: int | None, total_steps: int) -> int:
    """The warm-up length: as given, or 2.5% of the steps."""
    return warmup_steps if warmup_steps is not None else int(0.025 * total_steps)


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.1):
    warmup_steps = max(0, min(warmup_steps, total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(params, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.95)):
    """HybridAdam on GPU; torch AdamW on CPU processes, where HybridAdam's CPU kernel cannot build (its extension
    is registered as CUDA and includes cuda.h). Both follow AdamW semantics (decoupled weight decay)."""
    if device_type() == "cpu":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=1e-8, foreach=False)
    from colossalai.nn.optimizer import HybridAdam

    return HybridAdam(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=1e-8, adamw_mode=True)
