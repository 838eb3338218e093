"""The Trainer: one stage of training under a Booster plugin. Its parts are attributes, built once in `setup()`:

    plugin, booster, engine   the parallel layout, and what differs between plugins inside a step (engine.py)
    model, optimizer, scheduler
    sampler, batches          this rank's data in bucket (or dynamic-loading) order
    hooks                     the stage's extras: pruning, distillation, dynamic loading (hooks.py)
    checkpointer              when to save, what to save, how to resume (checkpoint.py)
    logger                    tensorboard, log lines, progress

`train()` is the whole loop; a new stage is a StageHooks subclass added in `_stage_hooks()`, not a branch here.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from colossal_shear.core.errors import Stopped, TrainingError
from colossal_shear.core.logger import get_logger
from colossal_shear.train.batches import Batches, make_sampler, model_inputs, real_tokens
from colossal_shear.train.config import TrainConfig, save_config
from colossal_shear.train.distributed import preemption
from colossal_shear.train.distributed.collective import all_true, fail
from colossal_shear.train.distributed.launch import launch
from colossal_shear.train.distributed.plugins import booster_kwargs, device_type, make_plugin, model_dtype
from colossal_shear.train.engine import make_engine, tensors_finite
from colossal_shear.train.evaluate import evaluate_losses
from colossal_shear.train.io import checkpoint as ckpt
from colossal_shear.train.io.export import export_hf
from colossal_shear.train.io.lock import lock_save_dir
from colossal_shear.train.io.metrics import flops_per_token, peak_flops
from colossal_shear.train.io.origin import run_origin, schedule_changes
from colossal_shear.train.io.run_logger import RunLogger
from colossal_shear.train.model import build_model, load_frozen_model
from colossal_shear.train.optim import continue_schedule, make_optimizer, resolve_warmup, warmup_cosine
from colossal_shear.train.preflight import Inputs, preflight
from colossal_shear.train.stages.base import HookList, StageHooks
from colossal_shear.train.stages.freeze import param_groups

log = get_logger(__name__)


class TrainState:
    """The counters a checkpoint carries."""

    def __init__(self):
        self.step, self.skipped, self.tokens = 0, 0, 0

    def state_dict(self) -> dict:
        return {"step": self.step, "skipped": self.skipped, "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.skipped, self.tokens = state["step"], state["skipped"], state["tokens"]


@dataclass
class StepResult:
    loss: float  # mean LM loss of the step's micro-batches over all data-parallel ranks
    grad_norm: float | torch.Tensor | None  # None when the step was skipped; a tensor is read only when logged
    tokens: int
    seconds: float
    stop: bool = False  # some rank was asked to stop (a signal, its launcher gone): every rank stops after this step


@dataclass
class Verdict:
    """What every rank agreed about one step."""

    loss: float
    tokens: int
    loss_finite: bool
    grads_finite: bool
    stop: bool = False


@dataclass
class Ranks:
    """Where this process sits: its data-parallel rank and size, and whether it reports the loss (one tensor-parallel
    rank of the last pipeline stage)."""

    dp_rank: int
    dp_size: int
    loss_rank: bool

    @classmethod
    def of(cls, plugin) -> Ranks:
        dp_group = getattr(plugin, "dp_group", None)
        stage_manager = getattr(plugin, "stage_manager", None)
        tp_group = getattr(plugin, "tp_group", None)
        return cls(
            dp_rank=dist.get_rank(dp_group),
            dp_size=dist.get_world_size(dp_group),
            loss_rank=(stage_manager is None or stage_manager.is_last_stage())
            and (tp_group is None or dist.get_rank(tp_group) == 0),
        )


class Trainer:
    def __init__(self, cfg: TrainConfig, inputs: Inputs):
        self.cfg, self.inputs = cfg, inputs
        self.data, self.evals = inputs.data, inputs.evals
        self.state = TrainState()
        self.bad_run, self.history, self.last_eval, self.last_eval_step = 0, [], None, None
        self.good_checkpoint = None  # the newest checkpoint known to hold finite weights (saved or resumed)
        self.stopped = None  # why every rank stopped before the end on request (preemption.py)

    # --- set-up --------------------------------------------------------------------------------------------------

    def setup(self) -> Trainer:
        from colossalai.booster import Booster

        cfg, par, opt = self.cfg, self.cfg.parallel, self.cfg.optim
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.lock = lock_save_dir(cfg.checkpoint.save_dir)  # one job per save_dir, before anything is written
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if device_type() == "cuda" else torch.device("cpu")
        )
        self.plugin = make_plugin(par, max_norm=opt.grad_clip)
        self.ranks = Ranks.of(self.plugin)
        self.booster = Booster(plugin=self.plugin, **booster_kwargs(par))
        self.engine = make_engine(self.booster, par, opt.grad_clip, self.device, self.ranks.loss_rank)
        torch.manual_seed(cfg.seed)

        per_step = opt.batch_size * opt.accumulation_steps
        steps_per_epoch = max(1, -(-sum(self.data.part_sizes) // self.ranks.dp_size) // per_step)
        self.total_steps = opt.max_steps or steps_per_epoch * opt.num_epochs
        self.warmup_steps = resolve_warmup(opt.warmup_steps, self.total_steps)

        model = build_model(cfg, self.inputs.model_path)
        self.sampler, weights = make_sampler(
            cfg,
            self.data,
            self.ranks.dp_rank,
            self.ranks.dp_size,
            self._reference_losses() if cfg.data.dynamic_loading else None,
        )
        self.hooks = HookList(self._stage_hooks(model, weights))
        optimizer = make_optimizer(
            param_groups([p for p in model.parameters() if p.requires_grad], opt.weight_decay),
            lr=opt.lr,
            weight_decay=opt.weight_decay,
        )
        scheduler = warmup_cosine(optimizer, self.warmup_steps, self.total_steps)
        self.model, self.optimizer, _, _, self.scheduler = self.booster.boost(model, optimizer, lr_scheduler=scheduler)
        self.batches = Batches(self.data, self.sampler, opt.batch_size)

        schedule = {"lr": opt.lr, "max_steps": self.total_steps}
        schedule.update(batch_size=opt.batch_size, accumulation_steps=opt.accumulation_steps)
        self.checkpointer = ckpt.CheckpointManager(
            cfg.checkpoint,
            self.booster,
            self.model,
            self.optimizer,
            ckpt.layout(par, self.world, self.ranks.dp_size),
            origin=run_origin(cfg, self.inputs, schedule),
            job=self.lock.job if self.lock else "",
        )
        self.checkpointer.register("train", self.state)
        self.checkpointer.register("scheduler", self.scheduler)
        self.checkpointer.register("hooks", self.hooks)
        self.checkpointer.register("sampler", self.sampler, per_rank=True)
        self.checkpointer.register("rng", ckpt.RNGState(), per_rank=True)

        self.flops_per_token, self.peak_flops = (
            flops_per_token(self.inputs.model_config, self.data.max_length),
            peak_flops(),
        )
        return self

    def _stage_hooks(self, model, weights) -> list[StageHooks]:
        """The stage's extras, in the order they run."""
        cfg, hooks = self.cfg, []
        if cfg.stage == "prune":
            from colossal_shear.train.stages.prune import PruneStage

            prune = PruneStage(
                cfg.prune,
                model,
                self.inputs.model_config,
                total_steps=self.total_steps,
                warmup_steps=self.warmup_steps,
                seed=cfg.seed,
                calibration_dataset=cfg.data.dataset[0],
                device=self.device,
                dp_rank=self.ranks.dp_rank,
            )
            hooks.append(prune)
        if cfg.distill.from_parent:  # the model being pruned, its masks bypassed: the boosted model, once built
            from colossal_shear.train.stages.distill import ParentDistillation

            hooks.append(
                ParentDistillation(cfg.distill, prune.masked, lambda: self.model, cfg.optim.accumulation_steps)
            )
        elif cfg.distill.teacher:
            from colossal_shear.train.stages.distill import Distillation

            teacher = load_frozen_model(cfg, cfg.distill.teacher, self.device)
            hooks.append(Distillation(cfg.distill, teacher, cfg.optim.accumulation_steps))
        if weights is not None:
            from colossal_shear.train.stages.dynamic_loading import DynamicLoading

            hooks.append(DynamicLoading(weights))
        return hooks

    def _reference_losses(self) -> dict:
        """Per-category reference losses for dynamic loading: given, or the eval loss of --reference_model."""
        from colossal_shear.data.domain_weights import parse_reference_losses

        if self.cfg.data.reference_loss:
            return parse_reference_losses(self.cfg.data.reference_loss)
        ref = load_frozen_model(self.cfg, self.cfg.data.reference_model, self.device)

        def loss_fn(inputs, ref=ref):
            with self.engine.autocast():
                return ref(**inputs).loss

        losses = evaluate_losses(
            self.evals,
            self.cfg.optim.batch_size,
            loss_fn,
            self.engine.compute_dtype,
            self.device,
            self.ranks.dp_rank,
            self.ranks.dp_size,
            True,
        )
        del ref
        return losses

    def resume(self) -> None:
        """Restore a checkpoint when one is given, then open the run's outputs (saved config, logger)."""
        cfg, where = self.cfg, self.cfg.checkpoint
        if where.load_checkpoint and not ckpt.is_hf_model_dir(where.load_checkpoint):
            self.good_checkpoint = self.checkpointer.resume(where.load_checkpoint)
            self._apply_changes()
        if where.save_dir and self.rank == 0:
            save_config(cfg, Path(where.save_dir) / "config.yaml", self.state.step)
        self.logger = RunLogger(cfg.log, cfg.stage, self.total_steps, self.rank == 0, start_step=self.state.step)
        if self.state.step == 0:
            start = self.hooks.start_scalars()
            if start:
                self.logger.scalars(0, start)

    def _apply_changes(self) -> None:
        """The schedule options this resume changes (README, Resuming): applied, said in one line; the learning rate
        continues from the checkpoint's (optim.continue_schedule)."""
        opt, step = self.cfg.optim, self.state.step
        changes = schedule_changes(self.checkpointer.resumed_origin, self.checkpointer.origin)
        if not changes and self.scheduler.base_lrs[0] != opt.lr:  # a checkpoint without an origin
            changes = [f"--lr {self.scheduler.base_lrs[0]} -> {opt.lr}"]
        if not changes:
            return
        line = f"--load_checkpoint {self.cfg.checkpoint.load_checkpoint}: {', '.join(changes)} applied from step {step}"
        if any(c.startswith(("--lr ", "--max_steps ")) for c in changes):
            line += "; " + continue_schedule(self.scheduler, step, opt.lr, self.total_steps)
        log.info(line)

    # --- the loop ------------------------------------------------------------------------------------------------

    def train(self) -> dict:
        self.resume()
        end = min(self.total_steps, self.cfg.checkpoint.stop_at_step or self.total_steps)
        self.model.train()
        while self.state.step < end:
            result = self.train_step()
            self.log_step(result)
            if self.bad_run >= self.cfg.optim.max_bad_steps:
                raise self._diverged(f"{self.bad_run} consecutive steps had a NaN/inf loss or gradient norm")
            if result.stop:  # agreed in the step's decision: every rank leaves the loop here, and saves below
                self.stopped = preemption.reason() or "another rank was asked to stop"
                break
            every = self.cfg.log.eval_interval
            if self.evals is not None and every and self.state.step % every == 0:
                self.evaluate()
            if self.checkpointer.due(self.state.step) and not self.bad_run:
                self.save()
        if self.bad_run:  # the run ends in a bad streak: nothing of it is worth keeping or exporting
            raise self._diverged(f"the last {self.bad_run} step(s) had a NaN/inf loss or gradient norm")
        if self.checkpointer.save_dir and self.checkpointer.last_saved != self.state.step:
            self.save()
        if self.state.step < self.total_steps or self.stopped:  # stopped early: the run continues from the checkpoint
            return self.finish()
        if self.evals is not None and self.last_eval_step != self.state.step:
            self.evaluate()
        self.export()
        return self.finish()

    def save(self) -> None:
        """A checkpoint only of finite weights, and never during a bad streak (a finite step can still overflow the
        weights): so the newest checkpoint is always a good one, and `--keep_last` rotation only drops older ones."""
        if not all_true(tensors_finite([p.detach() for p in self.model.parameters()], self.device)):
            raise self._diverged("the weights are no longer finite")
        self.good_checkpoint = self.checkpointer.save(self.state.step)

    def _diverged(self, what: str) -> TrainingError:
        where = (
            f"the newest checkpoint with finite weights is {self.good_checkpoint}"
            if self.good_checkpoint
            else "no checkpoint with finite weights was written by this run"
        )
        return TrainingError(
            f"{what} at step {self.state.step}: lower --lr, use bf16 or fp32, or check the data; {where}"
        )

    def train_step(self) -> StepResult:
        """Forward/backward over the accumulation micro-batches, then one optimizer step, skipped on every rank
        together when any rank's loss, objective or gradients are not finite. Losses stay on the device: the one
        host synchronisation of the step is that decision, which also brings back the step's loss and tokens."""
        started = time.perf_counter()
        step, n = self.state.step, self.cfg.optim.accumulation_steps
        losses, objectives, tokens = [], [], 0
        for micro in range(n):
            batch = self.batches.next()
            tokens += real_tokens(batch)
            self.hooks.before_forward(step, micro)
            loss, objective = self.engine.forward_backward(
                self.model,
                self.optimizer,
                model_inputs(batch, self.engine.compute_dtype, self.device),
                1.0 / n,
                self.hooks,
                step,
                micro == n - 1,
            )
            self.hooks.after_backward(step)
            if loss is not None and self.ranks.loss_rank:
                losses.append(loss)
            if objective is not None:
                objectives.append(objective)
        verdict = self._decide(losses, objectives, tokens if self.ranks.loss_rank else 0)
        applied = verdict.loss_finite and verdict.grads_finite
        if applied:
            grad_norm = self.engine.optimizer_step(self.model, self.optimizer)
        else:
            grad_norm = self.engine.skip_step(self.optimizer, verdict.loss_finite)
        self.hooks.after_optimizer_step(step, applied)
        self.optimizer.zero_grad()
        self.scheduler.step()
        self.bad_run = 0 if applied else self.bad_run + 1
        self.state.skipped += 0 if applied else 1
        self.state.step += 1
        self.state.tokens += verdict.tokens
        return StepResult(verdict.loss, grad_norm, verdict.tokens, time.perf_counter() - started, verdict.stop)

    def _decide(self, losses: list, objectives: list, tokens: int) -> Verdict:
        """One all-reduce and one host read for the whole step: the summed loss, its count and the tokens (for
        logging), how many ranks saw a non-finite objective or non-finite gradients, and how many were asked to stop
        (preemption.py): so stopping costs no collective of its own."""
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        loss_sum = torch.stack(losses).double().sum() if losses else zero
        objective_sum = torch.stack(objectives).double().sum() if objectives else zero
        grads_ok = self.engine.grads_finite(self.model, self.optimizer)
        packed = torch.stack(
            [
                loss_sum,
                zero + len(losses),
                zero + tokens,
                (~torch.isfinite(objective_sum)).double(),
                (~grads_ok).double(),
                zero + preemption.requested(),
            ]
        )
        dist.all_reduce(packed)
        loss_sum, count, tokens, bad_objectives, bad_grads, stop = packed.tolist()
        mean_loss = loss_sum / max(count, 1)
        return Verdict(
            mean_loss,
            int(tokens),
            loss_finite=math.isfinite(mean_loss) and not bad_objectives,
            grads_finite=not bad_grads,
            stop=bool(stop),
        )

    def log_step(self, r: StepResult) -> None:
        self.history.append(r.loss)
        tps = r.tokens / r.seconds
        self.logger.step(
            self.state.step,
            {
                "loss": r.loss,
                "lr": self.scheduler.get_last_lr()[0],
                "grad_norm": None if r.grad_norm is None else float(r.grad_norm),
                "tokens_per_s": tps,
                "mfu": tps * self.flops_per_token / (self.peak_flops * self.world) if self.peak_flops else None,
                "skipped_steps": self.state.skipped,
                "tokens": self.state.tokens,
                **self.hooks.scalars(self.state.step),
            },
        )

    def evaluate(self) -> dict:
        self.model.eval()
        self.hooks.train(False)
        losses = evaluate_losses(
            self.evals,
            self.cfg.optim.batch_size,
            lambda inputs: self.engine.eval_loss(self.model, inputs),
            self.engine.compute_dtype,
            self.device,
            self.ranks.dp_rank,
            self.ranks.dp_size,
            self.ranks.loss_rank,
        )
        self.model.train()
        self.hooks.train(True)
        self.logger.eval(self.state.step, losses)
        extra = self.hooks.after_evaluate(self.state.step, losses)
        if extra:
            self.logger.scalars(self.state.step, extra)
        self.last_eval, self.last_eval_step = losses, self.state.step
        return losses

    def export(self) -> None:
        if self.cfg.checkpoint.export_dir:
            export_hf(
                self.booster,
                self.model,
                self.cfg.checkpoint.export_dir,
                self.inputs.model_config,
                self.inputs.tokenizer,
                model_dtype(self.cfg.parallel),
                self.cfg.checkpoint.overwrite,
                self.hooks.export_transform(),
            )

    def finish(self) -> dict:
        result = {"steps": self.state.step, "losses": self.history, "skipped": self.state.skipped}
        if self.stopped:
            result["stopped"] = self.stopped
            saved = self.checkpointer.last_saved == self.state.step
            result["checkpoint"] = str(self.good_checkpoint) if saved else None
        if self.last_eval is not None and self.state.step >= self.total_steps:
            result["eval"] = self.last_eval
        if self.cfg.checkpoint.export_dir and self.state.step >= self.total_steps:
            result["export_dir"] = self.cfg.checkpoint.export_dir
        self.logger.close(result)
        return result


def train(cfg: TrainConfig) -> dict:
    """Check every input, join the process group, train, and leave the process group: cleanly (after a barrier)
    when every rank is done, at once when this rank fails (collective.fail), so no rank waits for a dead one."""
    preemption.install()  # SIGTERM / SIGINT / SIGUSR1 and a vanished launcher: stop at a step boundary, saving
    inputs = preflight(cfg)
    launch(seed=cfg.seed)
    try:
        result = Trainer(cfg, inputs).setup().train()
    except BaseException as error:
        leaving = fail(error)
        gc.collect()
        if leaving is error:
            raise
        raise leaving from None
    _shutdown()
    if "stopped" in result:
        raise _stopped(result, cfg.checkpoint.save_dir)
    return result


def _stopped(result: dict, save_dir: str | None) -> Stopped:
    saved = (
        f"saved {result['checkpoint']}; the same command with --load_checkpoint {save_dir} resumes it"
        if result["checkpoint"]
        else "nothing saved (no --save_dir)"
        if not save_dir
        else "no checkpoint saved"
    )
    return Stopped(f"stopped at step {result['steps']} ({result['stopped']}): {saved}")


def _shutdown():
    """Release Booster objects and the process group before interpreter exit, where colossalai's leftovers would
    otherwise be collected after the modules they need are gone. Only for ranks that all finished: a failing rank
    must not wait in a barrier its peers never reach."""
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
