"""The prune stage inside the trainer: hard-concrete masks on the standard HF model, a Lagrangian driving their
expected shape to the target, and at the end binary masks folded into a smaller plain HF model.

The masks and multipliers live outside the Booster (they are tiny, fp32, and replicated on every rank): their
gradients are averaged over all ranks by hand after each backward, and their own AdamW steps them (masks by
descent, multipliers by ascent: a min-max game). Their state travels in the trainer checkpoint.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from colossal_shear.pruning.apply import MaskedModel
from colossal_shear.pruning.fold import fold
from colossal_shear.pruning.lagrangian import Lagrangian
from colossal_shear.pruning.masks import PruningMasks
from colossal_shear.pruning.shape import PruneShape

from .hooks import StageHooks


class PruneStage(StageHooks):
    name = "prune"

    def __init__(self, cfg, model, model_config, total_steps: int, device, dp_rank: int):
        self.cfg, self.device, self.dp_rank = cfg, device, dp_rank
        self.source = PruneShape.from_config(model_config)
        self.target = PruneShape.parse(cfg.target_shape, model_config)
        self.target.validate_against(self.source)
        warmup = cfg.lagrangian_warmup_steps if cfg.lagrangian_warmup_steps is not None else int(0.2 * total_steps)
        self.masks = PruningMasks(model_config, self.target, init_log_alpha=cfg.mask_init).to(device)
        self.lagrangian = Lagrangian(self.source, self.target, warmup_steps=warmup).to(device)
        self.optimizer = torch.optim.AdamW([
            {"params": list(self.masks.parameters()), "lr": cfg.mask_lr, "weight_decay": 0.0},
            {"params": list(self.lagrangian.parameters()), "lr": cfg.lag_lr, "weight_decay": 0.0},
        ], betas=(0.9, 0.999))
        self._z = None
        self._seed = (cfg.seed, 0, 0)
        self.masked = MaskedModel(model, self._current_z)
        self.masked.attach()
        self.last_penalty = 0.0

    def _current_z(self):
        if self.masks.training:
            g = torch.Generator(device=self.device).manual_seed(hash(self._seed) % (2**62))
            return self.masks.sample(generator=g)
        return self.masks.deterministic()

    def before_forward(self, step: int, micro: int) -> None:
        """Masks are resampled for every micro-batch from a seed of (seed, step, micro, rank): exact on resume."""
        self._seed = (self.cfg.seed, step, micro, self.dp_rank)

    def extra_loss(self, step, inputs, outputs) -> torch.Tensor:
        loss = self.lagrangian.penalty(self.masks.expected_shape(), step)
        self.last_penalty = float(loss.detach())
        return loss

    def after_optimizer_step(self, step: int, applied: bool) -> None:
        if applied:
            self._step()
        else:
            self.optimizer.zero_grad()

    def _step(self) -> None:
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"]]
        flat = torch.cat([torch.zeros_like(p).flatten() if g is None else g.flatten() for g, p in
                          zip(grads, (p for group in self.optimizer.param_groups for p in group["params"]))])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for group_index, group in enumerate(self.optimizer.param_groups):
            for p in group["params"]:
                n = p.numel()
                g = flat[offset : offset + n].view_as(p)
                p.grad = -g if group_index == 1 else g  # multipliers: ascent
                offset += n
        self.optimizer.step()
        self.optimizer.zero_grad()

    def train(self, mode: bool = True) -> None:
        self.masks.train(mode)

    def scalars(self, step: int) -> dict:
        expected = {k: float(v.detach()) for k, v in self.masks.expected_shape().items()}
        targets = self.lagrangian.target_at(step)
        final = self.masks.target_shape()
        out = {"prune/expected_params": float(self.masks.expected_params().detach()),
               "prune/lagrangian": self.last_penalty}
        for k, v in expected.items():
            source = getattr(self.source, k)
            out[f"prune/expected_sparsity/{k}"] = 1 - v / source
            out[f"prune/target_sparsity/{k}"] = 1 - final[k] / source
            if k in targets:
                out[f"prune/ramped_target/{k}"] = targets[k]
        for k, (l1, l2) in self.lagrangian.lambdas().items():
            out[f"prune/lambda_1/{k}"], out[f"prune/lambda_2/{k}"] = l1, l2
        return out

    def state_dict(self) -> dict:
        return {"masks": self.masks.state_dict(), "lagrangian": self.lagrangian.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.masks.load_state_dict(state["masks"])
        self.lagrangian.load_state_dict(state["lagrangian"])
        self.optimizer.load_state_dict(state["optimizer"])

    def export_transform(self):
        """Binary masks with exactly the target counts, and the function that folds them into a dense HF model
        (the export then holds the smaller plain model)."""
        z = {k: v.detach().cpu() for k, v in self.masks.binarize().items()}
        self.masked.detach()
        return lambda dense: fold(dense, z, self.target)
