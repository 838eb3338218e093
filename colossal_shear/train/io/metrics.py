"""Throughput accounting: tokens/s and model FLOPs utilisation (MFU), the way litgpt and torchtitan count them."""

from __future__ import annotations

import torch

# dense bf16/fp16 peak of one device (no sparsity), FLOP/s
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "RTX 4090": 165e12,
}


def flops_per_token(config, seq_len: int) -> float:
    """6·N for the dense matmuls (forward + backward) + 12·L·d·S for attention scores and values."""
    d, layers = config.hidden_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = d // heads
    attn = d * head_dim * (heads + 2 * kv) + d * d
    mlp = 3 * d * config.intermediate_size
    params = layers * (attn + mlp) + config.vocab_size * d  # the LM head; the input embedding is a lookup
    return 6 * params + 12 * layers * d * seq_len


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return None
