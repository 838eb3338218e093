"""Gemma 1/2/3 (text): norms compute (1 + w) * x_hat in fp32, the embedding output is scaled by sqrt(hidden_size)
(Hugging Face recomputes it from the config: the fold keeps the source's scale by scaling the embedding rows, and
for a tied matrix divides the final norm's output by the same factor), Gemma 2/3 add sandwich norms after the
attention and the MLP (the residual contributions), Gemma 3 q/k norms over head_dim, and alternating sliding-window /
global layers."""

from __future__ import annotations

from colossal_shear.models.base import FamilyAdapter, config_get


class GemmaAdapter(FamilyAdapter):
    family = "gemma"
    model_types = ("gemma",)
    norm_offset = 1.0
    scaled_embedding = True

    def norm_output(self, module, x_hat, x):
        return (x_hat * (1.0 + module.weight.float())).type_as(x)


class Gemma2Adapter(GemmaAdapter):
    family = "gemma2"
    model_types = ("gemma2",)
    pre_norms = ("input_layernorm", "pre_feedforward_layernorm")
    post_norms = ("post_attention_layernorm", "post_feedforward_layernorm")

    def _sliding(self, config, i: int) -> bool:
        return i % 2 == 0

    def _types_matter(self, config) -> bool:
        """Whether a sliding layer computes something else than a global one on sequences the model accepts."""
        window = config_get(config, "sliding_window")
        return bool(window) and window < config_get(config, "max_position_embeddings", 0)

    def layer_types(self, config=None) -> list[str]:
        config = self.config if config is None else config
        n = int(config_get(config, "num_hidden_layers"))
        if not self._types_matter(config):
            return ["global"] * n
        return ["sliding" if self._sliding(config, i) else "global" for i in range(n)]


class Gemma3TextAdapter(Gemma2Adapter):
    family = "gemma3_text"
    model_types = ("gemma3_text",)
    head_norms = ("q_norm", "k_norm")

    def _sliding(self, config, i: int) -> bool:
        return bool((i + 1) % int(config_get(config, "sliding_window_pattern", 6)))

    def _types_matter(self, config) -> bool:
        """Sliding layers also use the local rotary embedding (rope_local_base_freq, no scaling)."""
        local_rope = config_get(config, "rope_local_base_freq") != config_get(config, "rope_theta") or bool(
            config_get(config, "rope_scaling")
        )
        return local_rope or super()._types_matter(config)

    def fix_buffers(self, model, config) -> None:
        """The scaled embedding's `embed_scale` buffer (not saved): sqrt of the new hidden size, as on reload."""
        import torch

        emb = model.get_input_embeddings()
        emb.embed_scale = torch.tensor(float(config.hidden_size) ** 0.5, device=emb.weight.device)
