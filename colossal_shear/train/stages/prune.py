"""The prune stage inside the trainer: hard-concrete masks on the standard HF model, their expected shape held on a
target that ramps in (a projection after every mask update: pruning/constraint.py), and at the end binary masks
folded into a smaller plain HF model.

The masks live outside the Booster (they are tiny, fp32, and replicated on every rank): their gradients are averaged
over all ranks by hand after each backward, and their own AdamW steps them. Their state travels in the trainer
checkpoint. As in the reference (Sheared-LLaMA), log_alpha is kept in [ln 0.01, ln 100], and the model's warm-up +
cosine schedule scales the masks' learning rate too (their own scheduler, stepped here: the trainer's optimizer and
scheduler are untouched), with betas (0.9, 0.95).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from colossal_shear.core.constants import (
    PRUNE_TOLERANCE as CONVERGED_TOLERANCE,
)  # one threshold for the log and the report
from colossal_shear.core.logger import get_logger
from colossal_shear.pruning.constraint import ShapeConstraint, schedule
from colossal_shear.pruning.fold import fold
from colossal_shear.pruning.masked_model import MaskedModel
from colossal_shear.pruning.masks import PruningMasks
from colossal_shear.pruning.shape import PruneShape
from colossal_shear.train.config import PruneConfig
from colossal_shear.train.optim import warmup_cosine
from colossal_shear.train.stages.base import StageHooks

log = get_logger(__name__)

BETAS = (0.9, 0.95)


class PruneStage(StageHooks):
    name = "prune"

    def __init__(
        self,
        cfg: PruneConfig,
        model,
        model_config,
        *,
        total_steps: int,
        warmup_steps: int,
        seed: int,
        calibration_dataset: str,
        device,
        dp_rank: int,
    ):
        """`cfg`: the run's prune section; `warmup_steps`: the model's warm-up, which the masks' schedule shares;
        `calibration_dataset`: where --mask_init_from importance measures activations."""
        self.cfg, self.seed, self.device, self.dp_rank = cfg, seed, device, dp_rank
        self.source = PruneShape.from_config(model_config)
        self.target = PruneShape.parse(cfg.target_shape, model_config)
        self.target.validate_against(self.source)
        ramp, harden = schedule(total_steps, cfg.target_ramp_steps, cfg.mask_harden_steps)
        self.masks = PruningMasks(model_config, self.target, init_log_alpha=cfg.mask_init, seed=seed).to(device)
        if cfg.mask_init_from == "importance":
            from colossal_shear.pruning.importance_init import importance_log_alpha

            importance_log_alpha(self.masks, model, calibration_dataset, cfg.mask_init, cfg.mask_init_spread)
        self.masks.constrain()
        self.constraint = ShapeConstraint(self.masks, ramp, harden)
        self.optimizer = torch.optim.AdamW(
            [{"params": list(self.masks.parameters()), "lr": cfg.mask_lr, "weight_decay": 0.0}], betas=BETAS
        )
        self.scheduler = warmup_cosine(self.optimizer, warmup_steps, total_steps)
        self._seed = (seed, 0, 0)
        self._hardness, self._binary = 0.0, None
        self.masked = MaskedModel(model, self._current_z)
        self.masked.attach()
        self._say(
            f"the target shape ramps in over steps 0-{ramp} of {total_steps} (the masks' expected shape is held on "
            f"it at every step), the masks harden to binary over steps {ramp}-{ramp + harden}, and the last "
            f"{total_steps - ramp - harden} steps train with exactly the masks of the fold"
        )

    def _say(self, line: str) -> None:
        (log.warning if "WARNING" in line else log.info)(f"prune: {line}")

    def _current_z(self):
        a = self._hardness
        if a >= 1.0:
            return self._binary
        if self.masks.training:
            g = torch.Generator(device=self.device).manual_seed(hash(self._seed) % (2**62))
            z = self.masks.sample(generator=g)
        else:
            z = self.masks.deterministic()
        if a > 0.0:
            z = {k: (1 - a) * v + a * self._binary[k] for k, v in z.items()}
        return z

    def before_forward(self, step: int, micro: int) -> None:
        """Masks are resampled for every micro-batch from a seed of (seed, step, micro, rank): exact on resume."""
        self._seed = (self.seed, step, micro, self.dp_rank)
        self.masks.constrain()
        if micro == 0:
            self._hardness = self.constraint.hardness(step)
            self._binary = self.masks.binarize() if self._hardness > 0 else None

    def after_optimizer_step(self, step: int, applied: bool) -> None:
        """Fully hardened masks no longer move: the binary masks the model trains with stay those of the fold."""
        if applied and self._hardness < 1.0:
            self._step()
        else:
            self.optimizer.zero_grad()
        self.scheduler.step()  # like the trainer's: every step, applied or skipped
        if self._hardness < 1.0:
            self.constraint.project(self.masks, step + 1)  # the next step's target

    def _step(self) -> None:
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"]]
        flat = torch.cat(
            [
                torch.zeros_like(p).flatten() if g is None else g.flatten()
                for g, p in zip(grads, (p for group in self.optimizer.param_groups for p in group["params"]))
            ]
        )
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                n = p.numel()
                p.grad = flat[offset : offset + n].view_as(p).clone()
                offset += n
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.masks.constrain()

    def train(self, mode: bool = True) -> None:
        self.masks.train(mode)

    def sparsity(self) -> dict[str, tuple[float, float]]:
        """{dim: (expected sparsity, final target sparsity)} for every dim of the shape."""
        expected = {k: float(v.detach()) for k, v in self.masks.expected_shape().items()}
        final = self.masks.target_shape()
        return {
            k: (1 - v / getattr(self.source, k), 1 - final[k] / getattr(self.source, k)) for k, v in expected.items()
        }

    def scalars(self, step: int) -> dict:
        targets = self.constraint.target_at(step)
        log_alpha = [g.log_alpha.detach() for g in self.masks.gates.values()]
        out = {"prune/expected_params": float(self.masks.expected_params().detach())}
        if log_alpha:  # none when the target is the source's shape
            out["prune/log_alpha_min"] = min(float(a.min()) for a in log_alpha)
            out["prune/log_alpha_max"] = max(float(a.max()) for a in log_alpha)
        for k, (expected, target) in self.sparsity().items():
            out[f"prune/expected_sparsity/{k}"] = expected
            out[f"prune/target_sparsity/{k}"] = target
            if k in targets:
                out[f"prune/ramped_target_sparsity/{k}"] = 1 - targets[k] / getattr(self.source, k)
        out["prune/hardness"] = self.constraint.hardness(step)
        for kind, share in self.masks.dropped_share().items():
            out[f"prune/dropped_share/{kind}"] = share
        return out

    def state_dict(self) -> dict:
        return {
            "masks": self.masks.state_dict(),
            "constraint": self.constraint.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.masks.load_state_dict(state["masks"])
        self.constraint.load_state_dict(state["constraint"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def convergence(self) -> dict[str, float]:
        """|expected - target| sparsity per pruned dim, printed before folding; loud when one is off by more than
        CONVERGED_TOLERANCE (the binary masks then force a shape the training did not reach: expect a worse
        model)."""
        gaps = {k: abs(e - t) for k, (e, t) in self.sparsity().items() if k in self.constraint.constraints}
        self._say("convergence |expected - target| sparsity: " + ", ".join(f"{k} {v:.3f}" for k, v in gaps.items()))
        off = {k: v for k, v in gaps.items() if v > CONVERGED_TOLERANCE}
        if off:
            self._say(
                "WARNING: the masks did NOT converge: "
                + ", ".join(f"{k} {v:.3f}" for k, v in off.items())
                + f" off target (> {CONVERGED_TOLERANCE}); the folded model is forced to the target shape. "
                "Give the prune stage more steps (see docs/pruning.md)."
            )
        return gaps

    def export_transform(self):
        """Binary masks with exactly the target counts, and the function that folds them into a dense HF model
        (the export then holds the smaller plain model)."""
        self.convergence()
        z = {k: v.detach().cpu() for k, v in self.masks.binarize().items()}
        self.masked.detach()
        return lambda dense: fold(dense, z, self.target)
