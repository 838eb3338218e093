"""The optimizer (HybridAdam on GPU, AdamW on CPU processes) and the learning-rate schedule: linear warm-up, then cosine
decay to 10% of the peak (Colossal-LLaMA-2, TinyLlama)."""

from __future__ import annotations

import math

import torch

from colossal_shear.train.distributed.plugins import device_type


def resolve_warmup(warmup_steps: int | None, total_steps: int) -> int:
    """The warm-up length: as given, or 2.5% of the steps."""
    return warmup_steps if warmup_steps is not None else int(0.025 * total_steps)


class WarmupCosine:
    """The factor of the peak learning rate at each step: linear warm-up to 1 over `warmup` steps, then a cosine to
    `min_ratio` at `total`. A callable object, not a closure, so that the scheduler's state_dict carries it (LambdaLR
    saves a callable object's attributes) and a resumed run continues the schedule it was saved with.

    After `resume(step, factor, total)` (a resume that changed the peak learning rate or the run's length) it goes on
    from `factor` at `step`: to 1 at the end of the warm-up when still in it, then (or at once) a cosine down to
    `min_ratio` at the new `total`, so that the learning rate never jumps."""

    def __init__(self, warmup: int, total: int, min_ratio: float = 0.1):
        self.warmup, self.total, self.min_ratio = max(0, min(warmup, total)), total, min_ratio
        self.start, self.start_factor = 0, None

    def resume(self, step: int, factor: float, total: int) -> None:
        self.start, self.start_factor, self.total = step, factor, total

    def __call__(self, step: int) -> float:
        anchor, peak = self.warmup, 1.0
        if self.start_factor is not None:
            if step < self.warmup:
                return self.start_factor + (1 - self.start_factor) * (step - self.start) / (self.warmup - self.start)
            if self.start >= self.warmup:
                anchor, peak = self.start, self.start_factor
        elif step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - anchor) / max(1, self.total - anchor)
        return self.min_ratio + (peak - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.1):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, min_ratio))


def continue_schedule(scheduler, step: int, lr: float, total_steps: int) -> str:
    """Apply a new peak `lr` and run length to a resumed warmup_cosine scheduler from `step` on, the learning rate
    continuing from the value the checkpoint left (the one the next step uses); return what it does, in words."""
    factor = scheduler.lr_lambdas[0]
    current = scheduler.get_last_lr()
    scale = lr / scheduler.base_lrs[0] if scheduler.base_lrs[0] else 1.0
    scheduler.base_lrs = [base * scale if scheduler.base_lrs[0] else lr for base in scheduler.base_lrs]
    factor.resume(step, current[0] / scheduler.base_lrs[0] if scheduler.base_lrs[0] else 0.0, total_steps)
    end = scheduler.base_lrs[0] * factor(total_steps)
    return f"the learning rate goes on from {current[0]:.3g} to {end:.3g} at step {total_steps}"


def make_optimizer(params, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.95)):
    """HybridAdam on GPU; torch AdamW on CPU processes, where HybridAdam's CPU kernel cannot build (its extension
    is registered as CUDA and includes cuda.h). Both follow AdamW semantics (decoupled weight decay)."""
    if device_type() == "cpu":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=1e-8, foreach=False)
    from colossalai.nn.optimizer import HybridAdam

    return HybridAdam(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=1e-8, adamw_mode=True)
