"""Learning-rate schedule: linear warm-up, then cosine decay to 10% of the peak (Colossal-LLaMA-2, TinyLlama)."""

import math

import torch


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
