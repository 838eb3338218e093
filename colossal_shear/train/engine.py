"""What differs between plugins inside one optimizer step, decided once at set-up so that the loop never asks which
plugin it runs under: how a micro-batch's forward/backward runs (plain, DDP without gradient sync until the last
micro-batch, or a pipeline schedule), the precision context, and how gradients are clipped and the step applied.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.distributed as dist

from colossal_shear.constants import DTYPES

from .plugins import ParallelConfig


class Engine:
    """Booster plugins that clip inside their optimizer (ZeRO, Gemini, 3d without pipeline)."""

    def __init__(self, booster, parallel: ParallelConfig, grad_clip: float, device, loss_rank: bool):
        self.booster, self.grad_clip, self.device, self.loss_rank = booster, grad_clip, device, loss_rank
        self.compute_dtype = DTYPES[parallel.mixed_precision]
        self.can_add_loss = True  # stage hooks may add terms to the loss

    def autocast(self):
        return nullcontext()

    def sync_context(self, model, optimizer, last_micro: bool):
        return nullcontext()

    def forward_backward(self, model, optimizer, inputs: dict, scale: float, hooks, step: int, last_micro: bool):
        """One micro-batch: returns (LM loss tensor or None, whether every rank's objective was finite). A
        non-finite objective on any rank skips this backward on all ranks together."""
        with self.autocast():
            outputs = model(**inputs)
            objective = outputs.loss
            extra = hooks.extra_loss(step, inputs, outputs)
            if extra is not None:
                objective = objective + extra
        if not _all_finite(objective, self.device):
            return outputs.loss.detach(), False
        with self.sync_context(model, optimizer, last_micro):
            self.booster.backward(objective * scale, optimizer)
        return outputs.loss.detach(), True

    def optimizer_step(self, model, optimizer) -> float:
        optimizer.step()
        return float(optimizer.get_grad_norm())

    def eval_loss(self, model, inputs: dict):
        with self.autocast():
            return model(**inputs).loss


class DDPEngine(Engine):
    """TorchDDPPlugin: fp32 master weights under bf16 autocast, gradient sync only on the last micro-batch, and
    clipping by hand (the plugin's optimizer wrapper does not clip)."""

    def __init__(self, booster, parallel, grad_clip, device, loss_rank):
        super().__init__(booster, parallel, grad_clip, device, loss_rank)
        self.bf16 = parallel.mixed_precision == "bf16"

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def sync_context(self, model, optimizer, last_micro):
        return nullcontext() if last_micro else self.booster.no_sync(model, optimizer)

    def optimizer_step(self, model, optimizer) -> float:
        params = [p for p in model.parameters() if p.requires_grad]
        norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip or math.inf))
        optimizer.step()
        return norm


class PipelineEngine(Engine):
    """HybridParallelPlugin with pp > 1: the schedule runs forward and backward itself, so nothing can be added to
    the loss and a non-finite loss is only known afterwards (the step is then skipped, not the backward)."""

    def __init__(self, booster, parallel, grad_clip, device, loss_rank):
        super().__init__(booster, parallel, grad_clip, device, loss_rank)
        self.can_add_loss = False

    def forward_backward(self, model, optimizer, inputs, scale, hooks, step, last_micro):
        out = self.booster.execute_pipeline(iter([inputs]), model, lambda o, _: o.loss * scale, optimizer,
                                            return_loss=True)
        loss = out["loss"] / scale if out["loss"] is not None else None
        return loss, True

    def eval_loss(self, model, inputs):
        return self.booster.execute_pipeline(iter([inputs]), model, lambda o, _: o.loss, None, return_loss=True)["loss"]


def make_engine(booster, parallel: ParallelConfig, grad_clip: float, device, loss_rank: bool) -> Engine:
    if parallel.plugin == "ddp":
        return DDPEngine(booster, parallel, grad_clip, device, loss_rank)
    if parallel.pipeline:
        return PipelineEngine(booster, parallel, grad_clip, device, loss_rank)
    return Engine(booster, parallel, grad_clip, device, loss_rank)


def _all_finite(value: torch.Tensor, device) -> bool:
    flag = torch.tensor([1.0 if torch.isfinite(value).all().item() else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
