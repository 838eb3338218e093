"""Distillation as a stage hook (Minitron): kd_weight * T^2 * KL(teacher || student) added to the loss."""

from __future__ import annotations

import torch

from colossal_shear.pruning.distill import kd_loss

from .hooks import StageHooks


class Distillation(StageHooks):
    name = "distill"

    def __init__(self, teacher, weight: float, temperature: float, accumulation_steps: int):
        self.teacher, self.weight, self.temperature = teacher, weight, temperature
        self.accumulation_steps = accumulation_steps
        self._sum = 0.0

    def extra_loss(self, step, inputs, outputs):
        with torch.no_grad():
            teacher_logits = self.teacher(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        term = kd_loss(outputs.logits, teacher_logits, inputs["labels"], self.temperature)
        self._sum += float(term.detach())
        return self.weight * term

    def scalars(self, step):
        value, self._sum = self._sum / self.accumulation_steps, 0.0
        return {"kd_loss": value}
