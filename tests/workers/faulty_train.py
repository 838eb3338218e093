"""train.py with a stage hook that injects one real fault, chosen by $FAULT, and records what each rank did to
$FAULT_LOG.rank-R.json (every optimizer step's `applied`, and the host synchronisations counted by phase).

    FAULT=raise:R:S     rank R raises RuntimeError before step S's forward (the time it did is recorded)
    FAULT=infgrad:R:S   rank R's gradient of one weight becomes inf during step S's backward, the loss stays finite
    FAULT=infgrads:R:S  the same in every step from step S on (a run that keeps diverging)
    FAULT=count         no fault: count host synchronisations (torch.distributed.all_reduce, and Tensor.item, tolist,
                        __float__, __int__, __bool__) per step and phase; the wrappers call the real functions.

Conversions made by host-side batch preparation (colossal_shear/train/batches.py and colossal_shear/data/, on the CPU
batch before it is moved to the device) are not synchronisations and are left out of the counts.
"""

import functools
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from colossal_shear import cli
from colossal_shear.train import trainer as trainer_module
from colossal_shear.train.stages.base import StageHooks
from colossal_shear.train.trainer import Trainer

HOST_SIDE = (os.path.join("colossal_shear", "train", "batches.py"), os.path.join("colossal_shear", "data", ""))


class Fault(StageHooks):
    name = "fault"

    def __init__(self, spec: str, accumulation_steps: int, model):
        kind, *where = spec.split(":")
        self.kind, self.n = kind, accumulation_steps
        self.rank, self.step = (int(where[0]), int(where[1])) if where else (None, None)
        self.applied, self.phase, self.counts, self.raised_at = {}, None, {}, None
        self.here = dist.get_rank() == self.rank
        if kind in ("infgrad", "infgrads") and self.here:
            weight = next(p for p in model.parameters() if p.requires_grad and p.dim() == 2)
            weight.register_hook(self._poison)
        self.current_step, self.backwards = None, 0

    def _poison(self, grad):
        if self.current_step == self.step or (self.kind == "infgrads" and self.current_step > self.step):
            grad = grad.clone()
            grad.view(-1)[0] = float("inf")
        return grad

    def before_forward(self, step, micro):
        self.current_step, self.phase = step, f"{step}/micro"
        if self.kind == "raise" and self.here and step == self.step:
            self.raised_at = time.time()
            self.dump()
            raise RuntimeError(f"injected fault on rank {self.rank} at step {step}")

    def after_backward(self, step):
        self.backwards = self.backwards + 1 if self.phase == f"{step}/micro" and self.backwards else 1
        if self.backwards == self.n:  # the last micro-batch: what follows is the step's decision and update
            self.phase, self.backwards = f"{step}/decision", 0

    def after_optimizer_step(self, step, applied):
        self.applied[step] = applied
        self.phase = f"{step}/after"

    def count(self, what, frame):
        """Counts by phase ("S/micro", "S/decision", "S/after"), kind and calling function."""
        path = frame.f_code.co_filename
        if self.phase is None or any(part in path for part in HOST_SIDE):
            return
        key = f"{self.phase}/{what}/{os.path.basename(path)}:{frame.f_code.co_name}"
        self.counts[key] = self.counts.get(key, 0) + 1

    def dump(self):
        with open(f"{os.environ['FAULT_LOG']}.rank-{dist.get_rank()}.json", "w") as f:
            json.dump({"applied": self.applied, "counts": self.counts, "raised_at": self.raised_at}, f)


def install_counters(fault: Fault) -> None:
    """Count, without changing, every call that makes the host wait for the device or for other ranks."""

    def counting(original, what):
        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            fault.count(what, sys._getframe(1))
            return original(*args, **kwargs)

        return wrapper

    dist.all_reduce = counting(dist.all_reduce, "all_reduce")
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name), "host_read"))


def work(cfg):
    """trainer.train with the fault hook added after set-up."""
    original_setup = Trainer.setup

    def setup(self):
        original_setup(self)
        self.fault = Fault(os.environ["FAULT"], cfg.optim.accumulation_steps, self.model)
        self.hooks.hooks.append(self.fault)
        if self.fault.kind == "count":
            install_counters(self.fault)
        return self

    Trainer.setup = setup
    original_finish = Trainer.finish

    def finish(self):
        self.fault.dump()
        return original_finish(self)

    Trainer.finish = finish
    return trainer_module.train(cfg)


if __name__ == "__main__":
    sys.exit(cli.run("train.py", work, lambda result: None))
