"""Attention for packed documents: which kernel a run uses, and how a packed batch reaches it.

`model_inputs` (data.py) passes `document_ids` (one id per document of a row, padding its own) when a row holds more
than one document; a forward pre-hook installed here on the model turns them into what its attention
implementation needs, so the trainer, the evaluation, the teacher and the reference model all feed batches the same
way:

    sdpa   the dense (B, 1, L, L) block-causal additive mask (the CPU path; FlexAttention has no backward on CPU)
    flex   a FlexAttention BlockMask with the document mask (O(L²/128²) memory, GPU)
    flash  no mask: the rows are flattened into one sequence whose position ids restart at each document, which
           transformers' flash_attention_2 turns into variable-length kernels (cu_seqlens)

A batch whose rows hold one document each gets no mask at all (plain causal SDPA, i.e. its flash kernels on a GPU).
"""

from __future__ import annotations

import importlib.util

import torch

from colossal_shear.core.errors import UserError
from colossal_shear.data.tokenization import IGNORE_INDEX

CHOICES = ("auto", "sdpa", "flex", "flash")
HF_NAMES = {"sdpa": "sdpa", "flex": "flex_attention", "flash": "flash_attention_2"}


class AttentionError(UserError, ValueError):
    """An attention implementation that cannot run here; raised before any model is loaded."""


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve(choice: str, device_type: str, plugin: str, flash_installed: bool | None = None) -> str:
    """The implementation a run uses ('sdpa', 'flex' or 'flash') for --attn_implementation `choice`; auto picks the
    fastest that works here."""
    if choice not in CHOICES:
        raise AttentionError(f"--attn_implementation {choice!r} is not one of {', '.join(CHOICES)}")
    flash_installed = flash_attn_available() if flash_installed is None else flash_installed
    if choice == "auto":
        if device_type != "cuda" or plugin == "3d":
            return "sdpa"
        return "flash" if flash_installed else "flex"
    if choice != "sdpa" and plugin == "3d":
        raise AttentionError(
            f"--attn_implementation {choice} cannot be used with --plugin 3d: shardformer replaces "
            "the attention forward with its own (ColoAttention); use sdpa or auto"
        )
    if choice == "flash" and (device_type != "cuda" or not flash_installed):
        raise AttentionError(
            "--attn_implementation flash (--use_flash_attn) needs a CUDA GPU and the flash-attn "
            f"package ({'not installed' if not flash_installed else 'no GPU here'}); use auto"
        )
    if choice == "flex" and device_type != "cuda":
        raise AttentionError(
            "--attn_implementation flex cannot train on CPU: FlexAttention has no backward on CPU in "
            "this torch; use auto or sdpa (the dense block-causal mask)"
        )
    return choice


def hf_name(implementation: str, config) -> str:
    """The `attn_implementation` transformers gets for ours. transformers' sdpa path drops attention-score
    soft-capping (Gemma 2's attn_logit_softcapping) without a word: such a model gets eager attention, which takes
    the same dense block-causal mask (flex and flash apply the capping themselves)."""
    if implementation == "sdpa" and getattr(config, "attn_logit_softcapping", None):
        return "eager"
    return HF_NAMES[implementation]


def block_mask(document_ids: torch.Tensor, window: int | None = None):
    """FlexAttention's BlockMask for packed rows: causal within a document (and the sliding window), nothing across."""
    from torch.nn.attention.flex_attention import create_block_mask

    docs = document_ids
    reach = window or document_ids.shape[1]

    def document_causal(b, h, q, kv):
        return (docs[b, q] == docs[b, kv]) & (q >= kv) & (q - kv < reach)

    batch, length = docs.shape
    return create_block_mask(document_causal, batch, None, length, length, device=docs.device)


def _mask_dtype(model, device: torch.device) -> torch.dtype:
    """The dtype attention computes in: autocast's when it is on (ddp bf16), else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype


def packed_inputs(implementation: str, kwargs: dict, dtype_of=None, window: int | None = None) -> dict:
    """Replace kwargs['document_ids'] by what `implementation` needs (see the module docstring); `window`: the
    model's sliding window where the mask must carry it (flash gets it from the model itself)."""
    from colossal_shear.data.collator import block_causal_mask

    docs = kwargs.pop("document_ids", None)
    if docs is None:
        return kwargs
    if implementation == "sdpa":
        kwargs["attention_mask"] = block_causal_mask(docs, dtype_of(docs.device), window)
    elif implementation == "flex":
        kwargs["attention_mask"] = block_mask(docs, window)
    else:  # flash: one row
        for key in ("input_ids", "position_ids"):
            if kwargs.get(key) is not None:
                kwargs[key] = kwargs[key].reshape(1, -1)
        if kwargs.get("labels") is not None:
            kwargs["labels"] = flat_labels(kwargs["labels"])
    return kwargs


def flat_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels of rows flattened into one (flash): a row's first label is never predicted (causal shift), so it must
    stay so in the flat row."""
    labels = labels.clone()
    labels[:, 0] = IGNORE_INDEX
    return labels.reshape(1, -1)


def labels_for(labels: torch.Tensor, tokens_shape) -> torch.Tensor:
    """`labels` as laid out in a model output of (batch, tokens) `tokens_shape` (flattened under flash)."""
    return labels if tuple(labels.shape) == tuple(tokens_shape) else flat_labels(labels)


def install(model, implementation: str):
    """Let `model` take `document_ids` (see the module docstring); returns the model."""
    from colossal_shear.models.registry import adapter_for

    window = adapter_for(model.config).mask_window()

    def hook(module, args, kwargs):
        return args, packed_inputs(implementation, kwargs, lambda device: _mask_dtype(module, device), window)

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return model
