"""Qwen2/2.5 (q/k/v biases: sliced with their rows by the fold) and Qwen3 (q_norm / k_norm over head_dim: pruning
heads leaves them, pruning hidden channels does not touch them)."""

from __future__ import annotations

from colossal_shear.models.base import FamilyAdapter, config_get


class Qwen2Adapter(FamilyAdapter):
    family = "qwen2"
    model_types = ("qwen2",)

    def layer_types(self, config=None) -> list[str]:
        """Layers from `max_window_layers` on use the sliding window when `use_sliding_window` is set."""
        config = self.config if config is None else config
        n = int(config_get(config, "num_hidden_layers"))
        if not (config_get(config, "use_sliding_window", False) and config_get(config, "sliding_window")):
            return ["global"] * n
        first = int(config_get(config, "max_window_layers", n) or 0)
        return ["sliding" if i >= first else "global" for i in range(n)]


class Qwen3Adapter(Qwen2Adapter):
    family = "qwen3"
    model_types = ("qwen3",)
    head_norms = ("q_norm", "k_norm")
