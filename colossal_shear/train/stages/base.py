"""Stage hooks: how a training stage (pruning, distillation, dynamic loading, ...) plugs into the Trainer without
the loop knowing it exists. Every method has a do-nothing default; the Trainer calls all of them unconditionally,
in this order within one optimizer step (and `lm_weight`, the factor of the LM loss in the objective: 1 unless a stage
says otherwise, the product of every stage's; distillation's --lm_weight):

    start_scalars()                        values to log once when a run starts from step 0
    before_forward(step, micro)            per micro-batch, before the model runs
    extra_loss(step, inputs, outputs)      added to the LM loss before backward (None: nothing to add)
    after_backward(step)                   per micro-batch, after its backward
    after_optimizer_step(step, applied)    once per step; applied=False when the step was skipped (non-finite)
    scalars(step)                          values to log for the step just finished
    after_evaluate(step, losses)           after each held-out evaluation; returns values to log
    train(mode)                            around evaluation: False before, True after
    state_dict() / load_state_dict(state)  saved in and restored from every checkpoint
    export_transform()                     a function applied to the plain HF model at export (or None)
"""

from __future__ import annotations

from collections.abc import Callable


class StageHooks:
    name = "stage"
    lm_weight = 1.0

    def start_scalars(self) -> dict:
        return {}

    def before_forward(self, step: int, micro: int) -> None:
        pass

    def extra_loss(self, step: int, inputs: dict, outputs):
        """With the chunked LM loss (the default) `outputs.logits` is None: use `outputs.last_hidden_state` and
        `outputs.lm_head_weight` (lm_loss.py; distill.py does)."""
        return None

    def after_backward(self, step: int) -> None:
        pass

    def after_optimizer_step(self, step: int, applied: bool) -> None:
        pass

    def scalars(self, step: int) -> dict:
        return {}

    def after_evaluate(self, step: int, losses: dict) -> dict:
        return {}

    def train(self, mode: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def export_transform(self) -> Callable | None:
        return None


class HookList(StageHooks):
    """Several stages at once, called in order; their states are kept under their names."""

    name = "hooks"

    def __init__(self, hooks: list[StageHooks]):
        names = [h.name for h in hooks]
        assert len(set(names)) == len(names), f"two stage hooks share a name: {names}"
        self.hooks = hooks
        self.lm_weight = 1.0
        for h in hooks:
            self.lm_weight *= h.lm_weight

    def start_scalars(self):
        return {k: v for h in self.hooks for k, v in h.start_scalars().items()}

    def before_forward(self, step, micro):
        for h in self.hooks:
            h.before_forward(step, micro)

    def extra_loss(self, step, inputs, outputs):
        total = None
        for h in self.hooks:
            term = h.extra_loss(step, inputs, outputs)
            if term is not None:
                total = term if total is None else total + term
        return total

    def after_backward(self, step):
        for h in self.hooks:
            h.after_backward(step)

    def after_optimizer_step(self, step, applied):
        for h in self.hooks:
            h.after_optimizer_step(step, applied)

    def scalars(self, step):
        return {k: v for h in self.hooks for k, v in h.scalars(step).items()}

    def after_evaluate(self, step, losses):
        return {k: v for h in self.hooks for k, v in h.after_evaluate(step, losses).items()}

    def train(self, mode):
        for h in self.hooks:
            h.train(mode)

    def state_dict(self):
        return {h.name: h.state_dict() for h in self.hooks}

    def load_state_dict(self, state):
        for h in self.hooks:
            h.load_state_dict(state.get(h.name, {}))

    def export_transform(self):
        transforms = [t for t in (h.export_transform() for h in self.hooks) if t is not None]
        if not transforms:
            return None

        def chained(model):
            for t in transforms:
                model = t(model)
            return model

        return chained
