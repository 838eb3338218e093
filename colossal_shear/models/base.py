"""The LLaMA-style decoder as the base adapter: what masking, importance scoring and folding need to know of a family.

A decoder layer reads the residual stream through norms over the hidden channels, owns query heads (rows of the
q projection, `head_dim` each), KV heads (rows of k and v) and MLP neurons (rows of gate and up, columns of down),
and writes back through `o_proj` and `down_proj` (or, with sandwich norms, through the norms after them). A family
differs from LLaMA by overriding the class attributes or methods below; `registry.adapter_for` picks the adapter.
Works on a Hugging Face config object or the dict of a config.json (no torch needed for the checks).
"""

from __future__ import annotations

from colossal_shear.core.errors import UserError

# config keys that mark a mixture-of-experts model (the fold prunes one dense MLP per layer)
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")


class ModelFamilyError(UserError, ValueError):
    """A model family, or a feature of one, that colossal_shear cannot handle exactly."""


def config_get(config, key: str, default=None):
    """A field of an HF config object or of a config.json dict."""
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def head_dim_of(config) -> int:
    """The head dimension of an HF config or config.json dict (explicit `head_dim`, else hidden / heads)."""
    hd = config_get(config, "head_dim")
    return int(hd) if hd else int(config_get(config, "hidden_size")) // int(config_get(config, "num_attention_heads"))


class FamilyAdapter:
    """LLaMA (1/2/3.x): RMSNorm `w * x_hat`, separate q/k/v and gate/up projections, no embedding scale."""

    family = "llama"
    model_types: tuple[str, ...] = ("llama",)
    norm_offset = 0.0  # a norm's output is (norm_offset + w) * x_hat
    pre_norms = ("input_layernorm", "post_attention_layernorm")  # norms whose output feeds the projections
    post_norms: tuple[str, ...] = ()  # sandwich norms on the attention / MLP outputs, before the residual add
    head_norms: tuple[str, ...] = ()  # per-head_dim norms inside the attention (q_norm, k_norm), kept as they are
    scaled_embedding = False  # the embedding output is multiplied by sqrt(hidden_size)

    def __init__(self, config):
        self.config = config

    def get(self, key: str, default=None):
        return config_get(self.config, key, default)

    # ------------------------------------------------------------------ checks
    def check(self) -> None:
        """Refuse features of a supported family that the masks and the fold do not handle."""
        moe = [k for k in MOE_KEYS if self.get(k)]
        if moe:
            raise ModelFamilyError(
                f"{self.get('model_type')}: mixture-of-experts models ({', '.join(moe)} in its config) are not "
                "supported: the masks and the fold prune one dense MLP per layer"
            )

    def layer_types(self, config=None) -> list[str]:
        """Each layer's attention type, where it changes what the layer computes ('global' / 'sliding')."""
        config = self.config if config is None else config
        return ["global"] * int(config_get(config, "num_hidden_layers"))

    def layer_pattern(self, target_layers: int) -> tuple[list[str], list[str]] | None:
        """(source layer types, the types a `target_layers`-layer config gives its positions) when the types are not
        all the same, else None: the kept layers must then be chosen so that each keeps its type at its new index
        (a smaller config recomputes each layer's type from its position)."""
        types = self.layer_types()
        if len(set(types)) <= 1:
            return None
        smaller = dict(self.config) if isinstance(self.config, dict) else self.config.to_dict()
        smaller["num_hidden_layers"] = int(target_layers)
        return types, self.layer_types(smaller)

    # ------------------------------------------------------------------ modules
    def decoder(self, model):
        """The decoder stack (embed_tokens, layers, norm) of a causal LM, or the stack itself. Not found through
        `base_model_prefix`: Gemma 3's text model names its prefix `language_model` but holds `.model`."""
        base = model.model if hasattr(model, "model") and hasattr(model.model, "layers") else model
        for name in ("embed_tokens", "layers", "norm"):
            if not hasattr(base, name):
                raise ModelFamilyError(f"{type(model).__name__}: not a {self.family} decoder (no .{name})")
        return base

    def hidden_norms(self, layer) -> list:
        """Every norm of a layer over the hidden channels (all are masked to the kept channels)."""
        return [getattr(layer, n) for n in self.pre_norms + self.post_norms]

    def scored_norms(self, layer) -> list:
        """The norms whose outputs feed the projections: importance scores hidden channels there."""
        return [getattr(layer, n) for n in self.pre_norms]

    def residual_outputs(self, layer) -> list:
        """The modules whose outputs are added to the residual stream (scaled by layer z x hidden z)."""
        if self.post_norms:
            return [getattr(layer, n) for n in self.post_norms]
        return [layer.self_attn.o_proj, layer.mlp.down_proj]

    def norm_output(self, module, x_hat, x):
        """The norm's output from the normalised input `x_hat` (fp32) and its input `x`, as the family computes it."""
        return module.weight * x_hat.to(x.dtype)

    def scaled_norm_weight(self, weight, scale):
        """The norm weight whose output is `scale` times this one's (a per-channel or scalar fp32 scale)."""
        w = weight.float()
        if hasattr(scale, "to"):
            scale = scale.to(w.device)
        return ((self.norm_offset + w) * scale - self.norm_offset).to(weight.dtype)

    def embed_scale(self, hidden_size: int) -> float:
        """What the model multiplies its embedding output by, for a hidden size."""
        return float(hidden_size) ** 0.5 if self.scaled_embedding else 1.0

    def mask_window(self) -> int | None:
        """The sliding window a 4D attention mask handed to the model must carry itself: the model applies it only
        to masks it builds (Mistral). None where there is none, or where the model applies it to any mask (Gemma)."""
        return None

    def logit_softcap(self) -> float | None:
        """The final logit soft-capping (logits = cap * tanh(z / cap)), if any."""
        return self.get("final_logit_softcapping") or None

    # ------------------------------------------------------------------ what a unit owns
    def attention_in_rows(self, q_rows, kv_rows, source) -> dict:
        """Attention input projection name -> the rows the kept heads own (q rows of kept query heads, k / v rows of
        kept KV heads)."""
        return {"q_proj": q_rows, "k_proj": kv_rows, "v_proj": kv_rows}

    def mlp_in_rows(self, neurons, source) -> dict:
        """MLP input projection name -> the rows the kept neurons own."""
        return {"gate_proj": neurons, "up_proj": neurons}

    def fix_buffers(self, model, config) -> None:
        """Set a folded model's non-persistent buffers that depend on the new shape (none for LLaMA)."""
