"""LLaMA 1/2/3.x and Mistral: the base adapter as it is (Mistral's sliding window is the same in every layer)."""

from __future__ import annotations

from colossal_shear.models.base import FamilyAdapter


class LlamaAdapter(FamilyAdapter):
    family = "llama"
    model_types = ("llama",)


class MistralAdapter(FamilyAdapter):
    family = "mistral"
    model_types = ("mistral",)

    def mask_window(self) -> int | None:
        return self.get("sliding_window") or None
