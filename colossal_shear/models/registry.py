"""`adapter_for(config)`: the adapter of a model's family, or one line saying it is not supported and which are."""

from __future__ import annotations

from colossal_shear.models.base import FamilyAdapter, ModelFamilyError, config_get
from colossal_shear.models.gemma import Gemma2Adapter, Gemma3TextAdapter, GemmaAdapter
from colossal_shear.models.llama import LlamaAdapter, MistralAdapter
from colossal_shear.models.phi3 import Phi3Adapter
from colossal_shear.models.qwen import Qwen2Adapter, Qwen3Adapter

ADAPTERS: dict[str, type[FamilyAdapter]] = {
    t: cls
    for cls in (
        LlamaAdapter,
        MistralAdapter,
        Qwen2Adapter,
        Qwen3Adapter,
        GemmaAdapter,
        Gemma2Adapter,
        Gemma3TextAdapter,
        Phi3Adapter,
    )
    for t in cls.model_types
}
SUPPORTED = tuple(ADAPTERS)
HINTS = {"gemma3": "use the text-only model (model_type gemma3_text, Gemma3ForCausalLM)"}


def adapter_for(config, what: str = "the model") -> FamilyAdapter:
    """The adapter for an HF config (or a config.json dict); ModelFamilyError (one line) for an unsupported model
    type or an unsupported feature of a supported one."""
    model_type = config_get(config, "model_type")
    cls = ADAPTERS.get(model_type)
    if cls is None:
        hint = f" ({HINTS[model_type]})" if model_type in HINTS else ""
        raise ModelFamilyError(
            f"{what}: model type {model_type!r} is not supported{hint}; supported: {', '.join(SUPPORTED)}"
        )
    adapter = cls(config)
    adapter.check()
    return adapter
