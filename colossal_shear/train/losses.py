"""The LM loss (and the distillation loss) over the LM head, chunk by chunk: a micro-batch's full fp32 logits
[tokens, vocabulary] are never held. With Llama-3's 128,256-token vocabulary they are most of a small model's memory
(2 × 2,048 tokens: 2.1 GB in fp32, plus their gradient).

Each autograd Function computes, per chunk of tokens (as many as a memory budget allows: `chunk_rows`), the logits
in the head's dtype, the loss terms in fp32, and at once the gradients w.r.t. the hidden states and the head weight
(the way fused linear cross-entropy kernels do), so backward only scales what forward stored. `install_chunked_loss`
replaces one model's forward (Hugging Face `*ForCausalLM` with a bias-free linear head) so that
`model(**inputs).loss` keeps working; with labels the output carries no logits but `last_hidden_state` and
`lm_head_weight`, from which the distillation hook computes its chunked KL term. Without labels the model's own
forward runs.

Under `--plugin 3d` with tensor or pipeline parallelism shardformer replaces the model's forward with its own
(vocabulary-parallel cross-entropy over the sharded head, sequence split), so the reference loss path runs there.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

from colossal_shear.data.tokenization import IGNORE_INDEX

CHUNK_BYTES = 64 * 2**20  # the least memory a chunk's vocabulary-sized buffers may take (see chunk_rows)
CE_FP32_BUFFERS = 2  # the fp32 logits and logsumexp's exp(logits - max); the gradient is computed in place
KD_FP32_BUFFERS = 5  # log_s, log_t, p_t, and (log_t - log_s) with its product by p_t


def chunk_rows(weight: torch.Tensor, fp32_buffers: int = CE_FP32_BUFFERS, chunk_bytes: int | None = None) -> int:
    """Tokens per chunk for a head weight [V, H]: as many as keep the chunk's vocabulary-sized buffers (per token,
    `fp32_buffers` fp32 rows of V, plus V in the head's dtype when that is not fp32: the logits before `.float()`
    and the gradient before the matmuls) within `chunk_bytes`.

    The budget, unless given: the fp32 gradient of the head that the loss accumulates anyway (V × H × 4 bytes), and
    at least CHUNK_BYTES. The floor keeps the 128,256-vocabulary, hidden-64 case of bench/lm_loss_memory.py (head
    gradient 33 MB) within the 1.5 GB aimed for (docs/benchmarks.md); above it a chunk holds no more than the loss
    already holds for the head, and takes 4·H / (bytes per logit) tokens whatever the vocabulary (0.4 × H for the
    cross-entropy over a bf16 head), so a large head is not passed over (its weight read twice, a [V, H] gradient
    added) for every few tokens."""
    vocab, hidden = weight.shape
    budget = chunk_bytes if chunk_bytes is not None else max(CHUNK_BYTES, vocab * hidden * 4)
    head_copy = 0 if weight.dtype == torch.float32 else weight.element_size()
    return max(1, budget // max(1, vocab * (4 * fp32_buffers + head_copy)))


class _PrecomputedGradients(torch.autograd.Function):
    """A chunked loss whose forward already computed d(loss)/d(hidden) and d(loss)/d(head weight) (inputs 0 and 1):
    backward only applies the incoming scale; the other inputs (labels, options) get no gradient."""

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        grad_weight = (grad_w * grad_out).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        others = [None] * (len(ctx.needs_input_grad) - 2)
        return (grad_h * grad_out.to(grad_h.dtype), grad_weight, *others)


def logit_softcap(config) -> float | None:
    """The final-logit soft-capping of a model config (Gemma 2: logits → c·tanh(logits / c)), or None."""
    return getattr(config, "final_logit_softcapping", None) or None


def _head_logits(h, weight, softcap):
    """fp32 logits of a chunk through the head, soft-capped when `softcap`; with the capping's derivative
    (1 - tanh², a buffer the chunk sizes count) or None."""
    logits = (h @ weight.t()).float()
    if not softcap:
        return logits, None
    tanh = logits.div_(softcap).tanh_()
    return tanh * softcap, tanh.mul_(tanh).neg_().add_(1.0)


class _ChunkedCrossEntropy(_PrecomputedGradients):
    @staticmethod
    def forward(ctx, hidden, weight, targets, denominator, chunk, with_grad, softcap=None):
        ctx.weight_dtype = weight.dtype
        grad_h = torch.empty_like(hidden) if with_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if with_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            valid = t != IGNORE_INDEX
            safe = t.clamp(min=0)[:, None]
            logits, capping = _head_logits(h, weight, softcap)
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, safe).squeeze(1)) * valid).sum()
            if with_grad:  # d/dlogits = softmax - onehot, per valid token, over the denominator
                probs = logits.sub_(lse[:, None]).exp_()
                probs.scatter_add_(1, safe, -valid[:, None].to(probs.dtype))
                probs.mul_((valid.to(probs.dtype) / denominator)[:, None])
                if capping is not None:  # through c·tanh(z / c)
                    probs.mul_(capping)
                g = probs.to(hidden.dtype)
                grad_h[start : start + chunk] = g @ weight
                grad_w += (g.t() @ h).float()
            del logits, capping
        if with_grad:
            ctx.save_for_backward(grad_h, grad_w)
        return total / denominator


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch=None,
    chunk_tokens: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Hugging Face's causal-LM loss (labels shifted by one, -100 ignored, mean over labelled tokens or a sum over
    `num_items_in_batch`) of hidden [B, T, H] through a head weight [V, H], without [B·T, V] logits: chunks of
    `chunk_tokens` tokens, by default as many as chunk_rows allows; logits soft-capped to ±`softcap` (Gemma 2's
    final_logit_softcapping) when given. No host synchronisation: the denominator stays on the device."""
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = labels[:, 1:].reshape(-1).to(hidden.device)
    if num_items_in_batch is not None:
        denominator = torch.as_tensor(num_items_in_batch, device=hidden.device, dtype=torch.float32)
    else:
        denominator = (targets != IGNORE_INDEX).sum().clamp(min=1).float()
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    chunk = chunk_tokens or chunk_rows(weight, CE_FP32_BUFFERS + (1 if softcap else 0))
    return _ChunkedCrossEntropy.apply(hidden, weight, targets, denominator, chunk, with_grad, softcap)


class _ChunkedKD(_PrecomputedGradients):
    @staticmethod
    def forward(ctx, hidden, weight, t_hidden, t_weight, keep, denominator, temperature, chunk, with_grad, caps):
        ctx.weight_dtype = weight.dtype
        grad_h = torch.empty_like(hidden) if with_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if with_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, k = hidden[start : start + chunk], keep[start : start + chunk].to(torch.float32)
            s, capping = _head_logits(h, weight, caps[0])
            log_s = torch.log_softmax(s.div_(temperature), dim=-1)
            t_logits = _head_logits(t_hidden[start : start + chunk], t_weight, caps[1])[0]
            log_t = torch.log_softmax(t_logits.div_(temperature), dim=-1)
            p_t = log_t.exp()
            total += ((p_t * (log_t - log_s)).sum(-1) * k).sum()
            del log_t, t_logits, s
            if with_grad:  # d(T²·KL)/d(logits) = T · (softmax(s/T) - softmax(t/T)), through the student's capping
                g = log_s.exp_().sub_(p_t).mul_((k * temperature / denominator)[:, None])
                g = (g if capping is None else g.mul_(capping)).to(hidden.dtype)
                grad_h[start : start + chunk] = g @ weight
                grad_w += (g.t() @ h).float()
            del log_s, p_t
        if with_grad:
            ctx.save_for_backward(grad_h, grad_w)
        return total * temperature**2 / denominator


def chunked_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
    softcaps: tuple[float | None, float | None] = (None, None),
) -> torch.Tensor:
    """`kd_loss` below (T²·KL(teacher ‖ student) per labelled token, after the causal shift)
    from hidden states and head weights, without the student's or the teacher's full logits; `softcaps` are the
    student's and the teacher's final-logit soft-capping (`logit_softcap`)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"student vocabulary {weight.shape[0]} and teacher vocabulary {teacher_weight.shape[0]} "
            "differ (same tokenizer and vocabulary size needed)"
        )
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    t_hidden = teacher_hidden[:, :-1].reshape(-1, teacher_hidden.shape[-1]).detach()
    keep = (labels[:, 1:] != IGNORE_INDEX).reshape(-1).to(hidden.device)
    denominator = keep.sum().clamp(min=1).float()
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _ChunkedKD.apply(
        hidden,
        weight,
        t_hidden,
        teacher_weight.detach(),
        keep,
        denominator,
        float(temperature),
        chunk_tokens or chunk_rows(weight, KD_FP32_BUFFERS + sum(1 for c in softcaps if c)),
        with_grad,
        tuple(softcaps),
    )


# --- the model hook ---------------------------------------------------------------------------------------------


@dataclass
class ChunkedCausalLMOutput(CausalLMOutputWithPast):
    """A causal-LM output without logits: what the chunked distillation loss needs instead."""

    last_hidden_state: torch.Tensor | None = None
    lm_head_weight: torch.Tensor | None = None
    logit_softcap: float | None = None


def head_weight(model) -> torch.Tensor:
    """The LM head's weight over the real vocabulary (shardformer's PaddingLMHead pads rows for tensor parallelism:
    they must not enter the softmax)."""
    head = model.get_output_embeddings()
    rows = getattr(head, "old_num_embeddings", None)
    return head.weight if rows is None or rows == head.weight.shape[0] else head.weight[:rows]


def supports_chunked_loss(model) -> str | None:
    """None when the chunked loss can replace the model's own, else why not."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(model, "get_decoder"):
        return f"{type(model).__name__} has no separate decoder and LM head"
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        bias = " with a bias" if getattr(head, "bias", None) is not None else ""
        return f"its LM head is {type(head).__name__}{bias}, not a bias-free linear layer"
    return None


def install_chunked_loss(model, chunk_tokens: int | None = None):
    """Make `model(..., labels=...)` compute the chunked loss (no logits; `chunk_tokens` per chunk, by default as
    chunk_rows sizes them); returns the model. Raises ValueError with the reason when the model is not a supported
    causal LM."""
    reason = supports_chunked_loss(model)
    if reason:
        raise ValueError(f"the chunked LM loss cannot be used: {reason} (use --lm_loss full)")

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        cache_position=None,
        **kwargs,
    ):
        inputs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            cache_position=cache_position,
            **kwargs,
        )
        if labels is None:  # the class's forward, not a captured bound method: a deep copy calls its own
            return type(self).forward(self, **inputs)
        return _chunked_lm_output(self, inputs, labels, chunk_tokens)

    model.forward = types.MethodType(forward, model)
    return model


def _chunked_lm_output(model, inputs: dict, labels, chunk_tokens: int | None) -> ChunkedCausalLMOutput:
    """The decoder's pass and the chunked loss over the head: the output carries hidden states, not logits."""
    num_items = inputs.pop("num_items_in_batch", None)
    inputs.pop("logits_to_keep", None)
    out = model.get_decoder()(**inputs)
    hidden, weight, softcap = out.last_hidden_state, head_weight(model), logit_softcap(model.config)
    loss = chunked_cross_entropy(hidden, weight, labels, num_items, chunk_tokens, softcap)
    return ChunkedCausalLMOutput(
        loss=loss,
        logits=None,
        past_key_values=out.past_key_values,
        hidden_states=out.hidden_states,
        attentions=out.attentions,
        last_hidden_state=hidden,
        lm_head_weight=weight,
        logit_softcap=softcap,
    )


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Logits [B, T, V], labels [B, T]. Position t's logits predict labels[t + 1] (as in the LM loss), so the loss
    compares logits[:, :-1] on the positions where labels[:, 1:] != -100. Computed in fp32; the teacher is detached.
    Returns a scalar (0, still attached to the student's graph, when no token carries a label)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ (same tokenizer and vocabulary size needed)"
        )
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
    return kl.mean() * (temperature**2)
