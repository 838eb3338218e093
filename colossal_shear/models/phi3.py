"""Phi-3: fused `qkv_proj` (rows: all query heads, then the KV heads' k rows, then their v rows) and `gate_up_proj`
(rows: the gate half, then the up half; neuron n owns row n of each half)."""

from __future__ import annotations

from colossal_shear.models.base import FamilyAdapter, config_get


class Phi3Adapter(FamilyAdapter):
    family = "phi3"
    model_types = ("phi3",)

    def _head_dim(self) -> int:
        hd = config_get(self.config, "head_dim")
        return int(hd) if hd else int(self.get("hidden_size")) // int(self.get("num_attention_heads"))

    def attention_in_rows(self, q_rows, kv_rows, source) -> dict:
        import torch

        q_size, kv_size = source.heads * self._head_dim(), source.kv_heads * self._head_dim()
        return {"qkv_proj": torch.cat([q_rows, q_size + kv_rows, q_size + kv_size + kv_rows])}

    def mlp_in_rows(self, neurons, source) -> dict:
        import torch

        return {"gate_up_proj": torch.cat([neurons, source.intermediate + neurons])}
