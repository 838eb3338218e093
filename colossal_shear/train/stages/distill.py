"""Distillation as a stage hook (Minitron): the objective becomes lm_weight * LM + kd_weight * T^2 * KL(teacher ||
student) (`lm_weight` scales the LM loss in the engine: `StageHooks.lm_weight`; the logged `loss` stays the LM's).

With the chunked LM loss (lm_loss.py) the student's output carries its last hidden states and head weight instead
of logits: the teacher then gives its hidden states too, and the KL term is computed chunk by chunk over both heads
(neither model's full logits are held). Otherwise (--lm_loss full, shardformer's forward) it compares whole logits.

The teacher is a frozen model of its own (`Distillation`), or, in the prune stage with `--teacher parent`, the model
being pruned run once more without gradients and with its masks bypassed (`ParentDistillation`): no second copy of
the weights, and a moving teacher (its weights are the ones being trained)."""

from __future__ import annotations

import torch

from colossal_shear.train.attention import labels_for
from colossal_shear.train.config import DistillConfig
from colossal_shear.train.losses import chunked_kd_loss, head_weight, kd_loss, logit_softcap
from colossal_shear.train.stages.base import StageHooks


class Distillation(StageHooks):
    name = "distill"

    def __init__(self, cfg: DistillConfig, teacher, accumulation_steps: int):
        """`cfg`: the run's distill section (its `teacher` path is the model already loaded as `teacher`)."""
        self.teacher, self.weight, self.temperature = teacher, cfg.kd_weight, cfg.kd_temperature
        self.lm_weight = cfg.lm_weight
        self.accumulation_steps = accumulation_steps
        self._sum = None  # a device tensor, read back only when the step's scalars are logged

    def extra_loss(self, step, inputs, outputs):
        teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        hidden = getattr(outputs, "last_hidden_state", None)
        if hidden is not None:
            labels = labels_for(inputs["labels"], hidden.shape[:2])
            term = chunked_kd_loss(
                hidden,
                outputs.lm_head_weight,
                self._teacher_hidden(teacher_inputs),
                head_weight(self.teacher),
                labels,
                self.temperature,
                softcaps=(outputs.logit_softcap, logit_softcap(self.teacher.config)),
            )
        else:
            teacher_logits = self._teacher_forward(teacher_inputs).logits
            term = kd_loss(
                outputs.logits, teacher_logits, labels_for(inputs["labels"], outputs.logits.shape[:2]), self.temperature
            )
        self._sum = term.detach() if self._sum is None else self._sum + term.detach()
        return self.weight * term

    def _teacher_forward(self, inputs: dict, **kwargs):
        """The teacher's output on `inputs`, without gradients."""
        with torch.no_grad():
            return self.teacher(**inputs, use_cache=False, **kwargs)

    def _teacher_hidden(self, inputs) -> torch.Tensor:
        """The teacher's last hidden states (after its final norm), its logits computed for one position only."""
        captured = []
        handle = self.teacher.get_decoder().register_forward_hook(lambda m, a, out: captured.append(out[0]))
        try:
            self._teacher_forward(inputs, logits_to_keep=1)
        finally:
            handle.remove()
        return captured[0]

    def scalars(self, step):
        value, self._sum = self._sum, None
        return {} if value is None else {"kd_loss": float(value) / self.accumulation_steps}


class ParentDistillation(Distillation):
    """`--teacher parent` in the prune stage: the teacher is the model being pruned with every gate open. After the
    student's (masked) forward, the same Booster-wrapped model runs once more under `torch.no_grad`, in eval mode,
    inside `MaskedModel.unmasked()`; the KL term is the usual one. Only plugins whose wrapper allows a no-grad forward
    between a forward and its backward (config.PARENT_TEACHER_PLUGINS) run it."""

    def __init__(self, cfg: DistillConfig, masked, boosted, accumulation_steps: int):
        """`masked`: the prune stage's MaskedModel (its `.model` is the HF model); `boosted()`: the Booster-wrapped
        model (built after the hooks)."""
        super().__init__(cfg, masked.model, accumulation_steps)
        self.masked, self.boosted = masked, boosted

    def _teacher_forward(self, inputs: dict, **kwargs):
        model, training = self.masked.model, self.masked.model.training
        model.train(False)  # no dropout, no activation checkpointing: the teacher as a frozen one would run
        try:
            with torch.no_grad(), self.masked.unmasked():
                return self.boosted()(**inputs, use_cache=False, **kwargs)
        finally:
            model.train(training)
