"""Dynamic batch loading as a stage hook (Sheared-LLaMA): after each evaluation the per-category sampling weights
move towards the categories whose loss is furthest above its reference. The weights live in the sampler (and so
in each rank's checkpoint state); this hook only updates and logs them."""

from __future__ import annotations

from colossal_shear.train.stages.base import StageHooks


class DynamicLoading(StageHooks):
    name = "dynamic_loading"

    def __init__(self, weights):
        self.weights = weights

    def start_scalars(self) -> dict:
        w = self.weights
        return {
            **{f"domain_reference/{c}": float(v) for c, v in zip(w.categories, w.reference)},
            **{f"domain_weight/{c}": v for c, v in w.as_dict().items()},
        }

    def after_evaluate(self, step, losses):
        self.weights.update(losses)
        return {f"domain_weight/{c}": w for c, w in self.weights.as_dict().items()}
