"""train.py with one extra stage hook that records every call: shows a new stage plugs in without touching the loop
(its calls, its checkpointed state and its export transform). Writes the record to $HOOK_LOG.rank-R.json."""

import json
import os
import sys

import torch.distributed as dist

from colossal_shear.core.config import parse
from colossal_shear.train.config import TrainConfig
from colossal_shear.train.distributed.collective import fail
from colossal_shear.train.distributed.launch import launch
from colossal_shear.train.preflight import preflight
from colossal_shear.train.stages.base import StageHooks
from colossal_shear.train.trainer import Trainer, _shutdown


class Recorder(StageHooks):
    name = "recorder"

    def __init__(self):
        self.calls, self.counter = [], 0

    def start_scalars(self):
        self.calls.append("start")
        return {"recorder/start": 1.0}

    def before_forward(self, step, micro):
        self.calls.append(f"before_forward {step} {micro}")

    def extra_loss(self, step, inputs, outputs):
        self.calls.append(f"extra_loss {step}")
        return outputs.loss * 0.0  # a real term in the graph that leaves the loss unchanged

    def after_backward(self, step):
        self.calls.append(f"after_backward {step}")

    def after_optimizer_step(self, step, applied):
        self.counter += 1
        self.calls.append(f"after_optimizer_step {step} {applied}")

    def scalars(self, step):
        return {"recorder/counter": float(self.counter)}

    def state_dict(self):
        return {"counter": self.counter}

    def load_state_dict(self, state):
        self.counter = state["counter"]
        self.calls.append(f"loaded {self.counter}")

    def export_transform(self):
        def mark(model):
            model.config.recorded_steps = self.counter
            return model

        return mark


if __name__ == "__main__":
    cfg = parse(TrainConfig, sys.argv[1:])
    inputs = preflight(cfg)
    launch(seed=cfg.seed)
    try:
        trainer = Trainer(cfg, inputs).setup()
        recorder = Recorder()
        trainer.hooks.hooks.append(recorder)
        trainer.train()
        with open(f"{os.environ['HOOK_LOG']}.rank-{dist.get_rank()}.json", "w") as f:
            json.dump({"calls": recorder.calls, "counter": recorder.counter}, f)
    except BaseException as error:  # as trainer.train does: a failing rank leaves without waiting for the others
        fail(error)
        raise
    _shutdown()
