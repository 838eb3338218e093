"""Lagrange multipliers that drive the masks' expected shape to the target (Sheared-LLaMA).

Per constraint c (only the dims the target shrinks: 'hidden', 'layers', 'heads', 'kv_heads', 'intermediate'):
    mean over layers of lambda1_c * (s_c - t_c) + lambda2_c * (s_c - t_c)^2
with s_c the masks' expected value and t_c the (ramped) target, both as fractions of the source value. Per-layer
dims (heads, kv_heads, intermediate) take the term per layer, then the mean over layers, as the reference does: a
layer far off its share is penalised quadratically even when the mean is on target (linear terms are unchanged). The
target ramps linearly from the source value to the final target over `warmup_steps`. The masks minimise the penalty, the
multipliers maximise it (the trainer steps them by gradient ascent): a min-max game.
"""

from __future__ import annotations

import torch
from torch import nn

from colossal_shear.pruning.shape import PruneShape

CONSTRAINTS = ("hidden", "layers", "heads", "kv_heads", "intermediate")


class Lagrangian(nn.Module):
    """One (lambda1, lambda2) pair per constraint: `lambda_1[i]`, `lambda_2[i]` for `self.constraints[i]`."""

    def __init__(self, source: PruneShape, target: PruneShape, warmup_steps: int):
        super().__init__()
        target.validate_against(source)
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.source = {k: float(getattr(source, k)) for k in CONSTRAINTS}
        self.target = {k: float(getattr(target, k)) for k in CONSTRAINTS}
        self.constraints = [k for k in CONSTRAINTS if self.target[k] != self.source[k]]
        self.warmup_steps = int(warmup_steps)
        self.lambda_1 = nn.Parameter(torch.zeros(len(self.constraints)))
        self.lambda_2 = nn.Parameter(torch.zeros(len(self.constraints)))

    def extra_repr(self) -> str:
        return f"constraints={self.constraints}, warmup_steps={self.warmup_steps}"

    def progress(self, step: int) -> float:
        if self.warmup_steps <= 0:
            return 1.0
        return min(max(step / self.warmup_steps, 0.0), 1.0)

    def target_at(self, step: int) -> dict[str, float]:
        """The ramped target for each constraint (in counts, like `PruningMasks.expected_shape`)."""
        f = self.progress(step)
        return {k: self.source[k] + (self.target[k] - self.source[k]) * f for k in self.constraints}

    def terms(self, expected: dict, step: int) -> dict[str, torch.Tensor]:
        """`expected[k]`: a count, or a vector of per-layer counts (`PruningMasks.expected_per_layer`)."""
        targets = self.target_at(step)
        out = {}
        for i, k in enumerate(self.constraints):
            s = expected[k] / self.source[k]
            diff = s - targets[k] / self.source[k]
            out[k] = (self.lambda_1[i] * diff + self.lambda_2[i] * diff * diff).mean()
        return out

    def penalty(self, expected: dict, step: int) -> torch.Tensor:
        """Sum over constraints of the mean over layers of lambda1 * (s - t) + lambda2 * (s - t)^2 (s, t as
        fractions of the source)."""
        terms = self.terms(expected, step)
        if not terms:
            return self.lambda_1.sum() * 0.0
        return torch.stack([v.reshape(()) for v in terms.values()]).sum()

    def lambdas(self) -> dict[str, tuple[float, float]]:
        l1, l2 = self.lambda_1.detach(), self.lambda_2.detach()
        return {k: (float(l1[i]), float(l2[i])) for i, k in enumerate(self.constraints)}
