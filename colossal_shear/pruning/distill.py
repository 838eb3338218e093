"""Knowledge-distillation loss (Minitron): T^2 * KL(softmax(teacher / T) || softmax(student / T)) per token, averaged
over the tokens that carry a label (masked like the LM loss, after the causal shift)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """Logits [B, T, V], labels [B, T]. Position t's logits predict labels[t + 1] (as in the LM loss), so the loss
    compares logits[:, :-1] on the positions where labels[:, 1:] != -100. Computed in fp32; the teacher is detached.
    Returns a scalar (0, still attached to the student's graph, when no token carries a label)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ (same tokenizer and vocabulary size needed)")
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(student_logits.shape)}")
    keep = labels[:, 1:] != IGNORE_INDEX
    if not keep.any():
        return student_logits.sum() * 0.0
    s = student_logits[:, :-1][keep].float() / temperature
    t = teacher_logits[:, :-1][keep].detach().float() / temperature
    log_s = F.log_softmax(s, dim=-1)
    log_t = F.log_softmax(t, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return kl.mean() * (temperature ** 2)
