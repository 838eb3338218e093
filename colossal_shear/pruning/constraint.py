"""The target shape as a hard constraint on the masks' expected shape: a ramp, and a projection onto it after every
mask update (this replaces Sheared-LLaMA's Lagrange multipliers; docs/pruning.md says why).

Per pruned dim (only those the target shrinks: 'hidden', 'layers', 'heads', 'kv_heads', 'intermediate') the target
count ramps linearly, over `ramp_steps`, from the masks' expected count at the start of the run to the final target.
`project()` then adds one scalar shift to the log_alpha of every gate of that dim (one shift per layer for the
per-layer dims: each layer keeps its own share, as the fold needs), found by bisection, so that the expected kept
count equals the ramped target. The LM gradient decides the order of the gates; the shift decides how many are on.
So the expected shape is on target at every step by construction: no multiplier to wind up, no overshoot, nothing
to tune per model, and a run of any length reaches its target when the ramp ends.

On target in expectation is not yet binary: a gate at P(z > 0) = 0.5 still carries half a unit that the fold will
keep or drop whole. So after the ramp the masks harden: over `harden_steps` the gates the model runs with move
linearly from the stochastic ones to the binary masks the fold will use (`hardness(step)` from 0 to 1), and from then
on the model trains with exactly the masks it will be folded with (the fold then changes nothing).
"""

from __future__ import annotations

import torch

from colossal_shear.pruning.hard_concrete import LOG_ALPHA_MAX, LOG_ALPHA_MIN
from colossal_shear.pruning.masks import PruningMasks

# The dims of the shape, the gate kind that carries each, and whether it is counted per layer.
CONSTRAINTS = {
    "hidden": ("hidden", False),
    "layers": ("layer", False),
    "kv_heads": ("group", True),
    "heads": ("head", True),
    "intermediate": ("intermediate", True),
}
BISECTION_STEPS = 50  # halves a shift range of about 20 down to 1e-14
# Defaults: the target ramps in over RAMP_FRACTION of the prune steps, the masks harden over the next
# HARDEN_FRACTION, and the rest trains the weights with exactly the masks of the fold (docs/pruning.md).
RAMP_FRACTION = 0.4
HARDEN_FRACTION = 0.3


def schedule(total_steps: int, ramp_steps: int | None = None, harden_steps: int | None = None) -> tuple[int, int]:
    """(ramp steps, harden steps) of a prune stage of `total_steps`; ValueError when they do not fit in it."""
    ramp = max(1, int(RAMP_FRACTION * total_steps)) if ramp_steps is None else ramp_steps
    harden = int(HARDEN_FRACTION * total_steps) if harden_steps is None else harden_steps
    if ramp + harden > total_steps:
        raise ValueError(
            f"--target_ramp_steps {ramp} + --mask_harden_steps {harden} is longer than the prune stage "
            f"({total_steps} steps): the masks could not reach the target shape and harden before the fold"
        )
    return ramp, harden


class ShapeConstraint:
    """The ramped target (`target_at`) and the projection that puts the masks' expected shape on it (`project`)."""

    def __init__(self, masks: PruningMasks, ramp_steps: int, harden_steps: int = 0):
        if ramp_steps < 0 or harden_steps < 0:
            raise ValueError(f"ramp_steps and harden_steps must be >= 0, got {ramp_steps} and {harden_steps}")
        self.ramp_steps, self.harden_steps = int(ramp_steps), int(harden_steps)
        self.source = {k: float(getattr(masks.source, k)) for k in CONSTRAINTS}
        self.target = {k: float(getattr(masks.target, k)) for k in CONSTRAINTS}
        # A dim is constrained when its gates are learnable; the heads of an unpruned ratio follow their groups.
        self.constraints = [k for k, (kind, _) in CONSTRAINTS.items() if kind in masks.gates]
        with torch.no_grad():
            start = masks.expected_shape()
        self.start = {k: float(start[k].detach()) for k in self.constraints}

    def progress(self, step: int) -> float:
        if self.ramp_steps <= 0:
            return 1.0
        return min(max(step / self.ramp_steps, 0.0), 1.0)

    def hardness(self, step: int) -> float:
        """0 until the ramp ends, then linear to 1 over harden_steps: the weight of the binary masks in the gates."""
        if step < self.ramp_steps:
            return 0.0
        if self.harden_steps <= 0:
            return 1.0
        return min((step - self.ramp_steps) / self.harden_steps, 1.0)

    def target_at(self, step: int) -> dict[str, float]:
        """The ramped target count of each constrained dim (per layer for the per-layer dims)."""
        f = self.progress(step)
        return {k: self.start[k] + (self.target[k] - self.start[k]) * f for k in self.constraints}

    @torch.no_grad()
    def project(self, masks: PruningMasks, step: int) -> None:
        """Shift the log_alpha of each constrained dim so that its expected count equals `target_at(step)`. Groups
        come before heads: a query head's expected count includes its group's keep probability."""
        targets = self.target_at(step)
        for dim in self.constraints:
            kind, per_layer = CONSTRAINTS[dim]
            gate = masks.gates[kind]
            log_alpha = gate.log_alpha.data
            weight = None
            if dim == "heads" and "group" in masks.gates:
                ratio = masks.source.heads // masks.source.kv_heads
                weight = masks.gates["group"].keep_prob().repeat_interleave(ratio, dim=-1)
            rows = log_alpha if per_layer else log_alpha.unsqueeze(0)
            weights = None if weight is None else (weight if per_layer else weight.unsqueeze(0))
            shift = _shift(gate, rows, weights, targets[dim])
            rows.copy_((rows + shift[:, None]).clamp(LOG_ALPHA_MIN, LOG_ALPHA_MAX))

    def state_dict(self) -> dict:
        return {"start": dict(self.start), "ramp_steps": self.ramp_steps, "harden_steps": self.harden_steps}

    def load_state_dict(self, state: dict) -> None:
        self.start = {k: float(v) for k, v in state["start"].items()}
        self.ramp_steps, self.harden_steps = int(state["ramp_steps"]), int(state["harden_steps"])


def _shift(gate, rows: torch.Tensor, weights: torch.Tensor | None, target: float) -> torch.Tensor:
    """Per row of `rows` ([R, n] log_alpha), the shift s with sum_n weight * P(z > 0 | clamp(log_alpha + s)) = target
    (bisection: the sum only grows with s). A target beyond what the clamp allows gives the nearest reachable."""
    lo = torch.full(rows.shape[:1], LOG_ALPHA_MIN - float(rows.max()) - 1.0, dtype=torch.float64, device=rows.device)
    hi = torch.full_like(lo, LOG_ALPHA_MAX - float(rows.min()) + 1.0)
    base = rows.double()
    w = None if weights is None else weights.double()
    offset = gate.beta * torch.log(torch.tensor(-gate.l / gate.r, dtype=torch.float64))
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        p = torch.sigmoid((base + mid[:, None]).clamp(LOG_ALPHA_MIN, LOG_ALPHA_MAX) - offset)
        count = (p if w is None else p * w).sum(-1)
        below = count < target
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return ((lo + hi) / 2).to(rows.dtype)
