"""What differs between plugins inside one optimizer step, decided once at set-up so that the loop never asks which
plugin it runs under: how a micro-batch's forward/backward runs (plain, DDP without gradient sync until the last
micro-batch, or a pipeline schedule), the precision context, and how gradients are clipped and the step applied.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from colossal_shear.core.constants import DTYPES
from colossal_shear.train.config import ParallelConfig


class Engine:
    """Booster plugins that clip inside their optimizer (ZeRO, Gemini, 3d without pipeline).

    Nothing here reads a value back to the host: a step's losses stay on the device until the Trainer's one
    decision per optimizer step (loss and gradients finite on every rank), which `grads_finite` feeds."""

    def __init__(self, booster, parallel: ParallelConfig, grad_clip: float, device, loss_rank: bool):
        self.booster, self.grad_clip, self.device, self.loss_rank = booster, grad_clip, device, loss_rank
        self.compute_dtype = DTYPES[parallel.mixed_precision]
        self.loss_scaled = parallel.mixed_precision == "fp16"  # a dynamic loss scaler skips overflowing steps
        self.can_add_loss = True  # stage hooks may add terms to the loss

    def autocast(self):
        return nullcontext()

    def sync_context(self, model, optimizer, last_micro: bool):
        return nullcontext()

    def forward_backward(self, model, optimizer, inputs: dict, scale: float, hooks, step: int, last_micro: bool):
        """One micro-batch: returns (LM loss, objective), detached device tensors (None on ranks that do not hold
        them). The objective is hooks.lm_weight x the LM loss plus the hooks' terms (with lm_weight 0 the LM loss
        is computed for the log only). A non-finite objective still runs its backward: the step is then skipped as a
        whole."""
        with self.autocast():
            outputs = model(**inputs)
            objective = outputs.loss * hooks.lm_weight if hooks.lm_weight else None
            extra = hooks.extra_loss(step, inputs, outputs)
            if extra is not None:
                objective = extra if objective is None else objective + extra
        with self.sync_context(model, optimizer, last_micro):
            self.booster.backward(objective * scale, optimizer)
        return outputs.loss.detach(), objective.detach()

    def grads_finite(self, model, optimizer) -> torch.Tensor:
        """Whether this rank's share of the step's gradients is finite (a 0-dim bool on the device, not read back):
        checked before `optimizer.step()`, which under ZeRO/Gemini/3d clips by a non-finite norm and applies it."""
        chunks = getattr(optimizer, "chunk16_set", None)
        if chunks is not None:  # Gemini: gradients live in chunks, whose norms it computed while reducing them
            reuse = optimizer.module.chunk_manager.reuse_fp16_chunk
            norms = [(c if reuse else c.grad_chunk).l2_norm for c in chunks]
            return torch.full((), all(n is None or math.isfinite(n) for n in norms), device=self.device)
        return tensors_finite(local_gradients(model, optimizer), self.device)

    def optimizer_step(self, model, optimizer):
        """Apply the step; returns the gradient norm before clipping (a float, or a device tensor read at logging)."""
        optimizer.step()
        return optimizer.get_grad_norm()

    def skip_step(self, optimizer, loss_finite: bool) -> None:
        """A step not applied. When only the gradients overflowed under a dynamic loss scaler, its optimizer step is
        what lowers the scale (it skips the update itself on every rank)."""
        if self.loss_scaled and loss_finite:
            optimizer.step()

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

    def optimizer_step(self, model, optimizer):
        if self.loss_scaled:
            optimizer.unscale_grad()  # clip the true gradients, not the scaled ones
        params = [p for p in model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip or math.inf)
        optimizer.step()
        return norm.detach()


class PipelineEngine(Engine):
    """HybridParallelPlugin with pp > 1: the schedule runs forward and backward itself, so nothing can be added to
    the loss, and the loss exists only on the last stage."""

    def __init__(self, booster, parallel, grad_clip, device, loss_rank):
        super().__init__(booster, parallel, grad_clip, device, loss_rank)
        self.can_add_loss = False

    def forward_backward(self, model, optimizer, inputs, scale, hooks, step, last_micro):
        out = self.booster.execute_pipeline(
            iter([inputs]), model, lambda o, _: o.loss * scale, optimizer, return_loss=True
        )
        loss = out["loss"].detach() / scale if out["loss"] is not None else None
        return loss, loss

    def eval_loss(self, model, inputs):
        return self.booster.execute_pipeline(iter([inputs]), model, lambda o, _: o.loss, None, return_loss=True)["loss"]


def make_engine(booster, parallel: ParallelConfig, grad_clip: float, device, loss_rank: bool) -> Engine:
    if parallel.plugin == "ddp":
        return DDPEngine(booster, parallel, grad_clip, device, loss_rank)
    if parallel.pipeline:
        return PipelineEngine(booster, parallel, grad_clip, device, loss_rank)
    return Engine(booster, parallel, grad_clip, device, loss_rank)


def local_gradients(model, optimizer) -> list[torch.Tensor]:
    """The gradients this rank holds for the coming step: ZeRO optimizers (zero2, 3d with --zero_stage) keep this
    rank's reduced partitions in their own store; the other plugins leave them on the model's parameters."""
    if hasattr(optimizer, "get_working_grads_by_group_id"):
        groups = range(optimizer.num_param_groups)
        return [g for group in groups for g in optimizer.get_working_grads_by_group_id(group)]
    return [p.grad for p in model.parameters() if p.grad is not None]


def tensors_finite(tensors: list[torch.Tensor], device) -> torch.Tensor:
    """A 0-dim bool on `device`: no NaN/inf in any tensor and no overflowing norm. One fused norm per device."""
    by_device: dict = {}
    for norm in torch._foreach_norm(tensors) if tensors else []:
        by_device.setdefault(norm.device, []).append(norm.float())
    flags = [torch.isfinite(torch.stack(norms)).all().to(device) for norms in by_device.values()]
    return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool, device=device)
