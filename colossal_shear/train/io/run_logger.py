"""Run logging: tensorboard scalars and a progress bar (one process keeps them: `enabled`, rank 0), and a one-line
summary per log interval through the package logger, which shows it once per job."""

from __future__ import annotations

import json
import sys

from colossal_shear.core.logger import get_logger
from colossal_shear.train.config import LogConfig

log = get_logger(__name__)


class RunLogger:
    """Configured by the run's log section; `name` (the stage) labels the progress bar."""

    def __init__(self, cfg: LogConfig, name: str, total_steps: int, enabled: bool, start_step: int = 0):
        self.interval = max(1, cfg.log_interval)
        self.writer = self.bar = None
        if not enabled:
            return
        if cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(cfg.tensorboard_dir)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=name, dynamic_ncols=True)

    def step(self, step: int, scalars: dict) -> None:
        if self.writer:
            for k, v in scalars.items():
                if v is not None:
                    self.writer.add_scalar(k if "/" in k else f"train/{k}", v, step)
        if self.bar:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{scalars['loss']:.4f}")
        if step % self.interval == 0:
            parts = [f"step {step}"] + [_fmt(k, v) for k, v in scalars.items() if v is not None and "/" not in k]
            log.info(" | ".join(parts))

    def scalars(self, step: int, values: dict) -> None:
        """Extra tensorboard points (domain weights, ...), also logged on one line."""
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
        log.info(f"step {step} | " + " | ".join(f"{k} {v:.4g}" for k, v in values.items()))

    def eval(self, step: int, losses: dict) -> None:
        if self.writer:
            for cat, v in losses.items():
                self.writer.add_scalar(f"eval/loss/{cat}", v, step)
        log.info(f"eval step {step} | " + " | ".join(f"{c} {v:.4f}" for c, v in losses.items()))

    def close(self, result: dict) -> None:
        if self.bar:
            self.bar.close()
        if self.writer:
            self.writer.flush()
            self.writer.close()
        summary = {k: v for k, v in result.items() if k != "losses"}
        summary["final_loss"] = result["losses"][-1] if result["losses"] else None
        log.info("done " + json.dumps(summary))


def _fmt(k, v):
    if k == "lr":
        return f"lr {v:.3e}"
    if isinstance(v, float):
        return f"{k} {v:.4g}"
    return f"{k} {v}"
