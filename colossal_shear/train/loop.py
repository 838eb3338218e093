"""One stage of training under a Booster plugin: load, check, boost, step, evaluate, checkpoint, export.

Called by train.py on every rank of a `colossalai run` / `torchrun` launch. Every check that can fail on user input
runs before the process group does any work.
"""

from __future__ import annotations

import gc
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from colossal_shear.data.collator import block_causal_mask, collate
from colossal_shear.data.prepared import open_prepared
from colossal_shear.data.sampler import BucketSampler
from colossal_shear.pruning.distill import kd_loss

from . import checkpoint as ckpt
from .config import TrainConfig, save_config
from .freeze import check_train_embeddings, freeze_old_rows, param_groups
from .log import RunLogger
from .metrics import flops_per_token, peak_flops
from .plugins import check_parallel_config, device_type, launch, make_optimizer, make_plugin
from .schedule import warmup_cosine

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingError(RuntimeError):
    pass


def preflight(cfg: TrainConfig):
    """Everything that can be checked from the files and flags alone, before any process group work."""
    from transformers import AutoConfig, AutoTokenizer

    if not cfg.pretrained and not (cfg.load_checkpoint and ckpt.is_hf_model_dir(cfg.load_checkpoint)):
        raise TrainingError("--pretrained is required (a Hugging Face model directory)")
    if not cfg.dataset:
        raise TrainingError("--dataset is required (a data-prep output directory or part)")
    model_path = cfg.load_checkpoint if cfg.load_checkpoint and ckpt.is_hf_model_dir(cfg.load_checkpoint) \
        else cfg.pretrained
    if not (Path(model_path) / "config.json").is_file():
        raise TrainingError(f"--pretrained {model_path}: no config.json (not a Hugging Face model directory)")
    model_config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code)
    check_parallel_config(cfg.parallel(), world_size=int(os.environ.get("WORLD_SIZE", 1)), model_config=model_config)
    if cfg.use_flash_attn:
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            raise TrainingError("--use_flash_attn needs the flash-attn package (pip install flash-attn)") from None
        if device_type() == "cpu":
            raise TrainingError("--use_flash_attn needs a CUDA GPU")
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code)
    train = open_prepared(cfg.dataset, tokenizer, cfg.max_length, model_config.max_position_embeddings)
    evals = open_prepared(cfg.eval_dataset, tokenizer, train.max_length) if cfg.eval_dataset else None
    for name in ("save_dir", "tensorboard_dir", "export_dir"):
        value = getattr(cfg, name)
        if value:
            _check_writable(Path(value), f"--{name}")
    if cfg.save_dir and not cfg.load_checkpoint and not cfg.overwrite and (Path(cfg.save_dir) / ckpt.LATEST).exists():
        raise TrainingError(f"--save_dir {cfg.save_dir} already holds checkpoints of another run: resume with "
                            f"--load_checkpoint {cfg.save_dir}, or pass --overwrite")
    if cfg.export_dir and not cfg.overwrite and Path(cfg.export_dir).is_dir() and any(Path(cfg.export_dir).iterdir()):
        raise TrainingError(f"--export_dir {cfg.export_dir} exists and is not empty (pass --overwrite)")
    _check_stage_options(cfg, model_config, train, evals)
    try:
        check_train_embeddings(cfg, model_path, model_config)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    if cfg.pp > 1 and cfg.batch_size % cfg.microbatch_size:
        raise TrainingError(f"--batch_size {cfg.batch_size} must be a multiple of --microbatch_size {cfg.microbatch_size}")
    return model_path, model_config, tokenizer, train, evals


def _check_stage_options(cfg, model_config, train, evals) -> None:
    if cfg.stage == "prune":
        from colossal_shear.pruning.shape import PruneShape

        if not cfg.target_shape:
            raise TrainingError("--stage prune needs --target_shape (hidden,heads,layers,intermediate[,kv_heads] or a "
                                "config.json)")
        try:
            PruneShape.parse(cfg.target_shape, model_config).validate_against(PruneShape.from_config(model_config))
        except (ValueError, FileNotFoundError) as e:
            raise TrainingError(f"--target_shape: {e}") from None
        if cfg.plugin == "3d":
            raise TrainingError("--stage prune runs under ddp, zero2, zero2_cpu or gemini: the 3d plugin's shardformer "
                                "replaces the modules the masks hook into, and tp/pp split heads and layers across ranks")
        if cfg.mixed_precision == "fp16":
            raise TrainingError("--stage prune needs bf16 or fp32: fp16 loss scaling would scale the masks' gradients")
        if not cfg.export_dir:
            raise TrainingError("--stage prune needs --export_dir: the pruned model is folded and written there")
    if cfg.dynamic_loading:
        if evals is None or not cfg.eval_interval:
            raise TrainingError("--dynamic_loading needs --eval_dataset and --eval_interval (weights move after evals)")
        if bool(cfg.reference_loss) == bool(cfg.reference_model):
            raise TrainingError("--dynamic_loading needs exactly one of --reference_loss or --reference_model")
        missing = [c for c in train.categories if c not in evals.categories]
        if missing:
            raise TrainingError(f"--eval_dataset has no sequences of categor{'ies' if len(missing) > 1 else 'y'} "
                                f"{', '.join(missing)}, which dynamic loading needs to weigh")
        if cfg.reference_loss:
            from colossal_shear.data.domain_weights import parse_reference_losses

            given = parse_reference_losses(cfg.reference_loss)
            if sorted(given) != sorted(train.categories):
                raise TrainingError(f"--reference_loss names {sorted(given)}; the dataset's categories are "
                                    f"{sorted(train.categories)}")
    for flag in ("teacher", "reference_model"):
        path = getattr(cfg, flag)
        if path and not (Path(path) / "config.json").is_file():
            raise TrainingError(f"--{flag} {path}: no config.json (not a Hugging Face model directory)")
    if cfg.teacher:
        from transformers import AutoConfig

        if cfg.pp > 1:
            raise TrainingError("--teacher is not supported with --pp > 1 (the student's logits live on the last stage)")
        t = AutoConfig.from_pretrained(cfg.teacher, trust_remote_code=cfg.trust_remote_code)
        if t.vocab_size != model_config.vocab_size:
            raise TrainingError(f"--teacher vocab size {t.vocab_size} differs from the model's "
                                f"{model_config.vocab_size}: distillation compares logits token by token")


def _check_writable(path: Path, flag: str) -> None:
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise TrainingError(f"{flag} {path}: {probe} is not a writable directory")


def build_model(cfg: TrainConfig, model_path: str):
    """Built straight in its precision on its device with no LazyInitContext (which recurses forever on new torch)."""
    from transformers import AutoModelForCausalLM

    attn = "flash_attention_2" if cfg.use_flash_attn else "sdpa"
    # ddp trains fp32 master weights under autocast; the other plugins cast to their precision themselves
    dtype = torch.float32 if cfg.plugin == "ddp" else DTYPES[cfg.mixed_precision]
    kwargs = {}
    if device_type() == "cuda" and not cfg.plugin.startswith("gemini"):
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=dtype, attn_implementation=attn,
                                                 trust_remote_code=cfg.trust_remote_code, **kwargs)
    if cfg.use_grad_checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.freeze_non_embeds_params or cfg.stage == "align":
        trainable = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable)
    if cfg.train_embeddings == "new":  # old rows frozen by a gradient hook (before boost), see train/freeze.py
        freeze_old_rows(model, model_path)
    model.config.use_cache = False
    return model


class Batches:
    """Fetch micro-batches for this data-parallel rank, in the sampler's order."""

    def __init__(self, data, sampler: BucketSampler, batch_size: int):
        self.data, self.sampler, self.batch_size = data, sampler, batch_size

    def next(self) -> dict:
        return collate(self.data.dataset[self.sampler.take(self.batch_size)])


def model_inputs(batch: dict, dtype: torch.dtype, device) -> dict:
    inputs = {k: batch[k].to(device) for k in ("input_ids", "labels", "position_ids")}
    if int(batch["num_docs"].max()) > 1:  # packed documents must not attend to each other
        inputs["attention_mask"] = block_causal_mask(batch["segment_ids"].to(device), dtype)
    return inputs


def _group_info(plugin):
    """(dp_group, dp_rank, dp_size, is_loss_rank) for any plugin: loss is reported by one tp rank of the last stage."""
    dp_group = getattr(plugin, "dp_group", None)
    dp_rank = dist.get_rank(dp_group) if dp_group is not None else dist.get_rank()
    dp_size = dist.get_world_size(dp_group) if dp_group is not None else dist.get_world_size()
    stage_manager = getattr(plugin, "stage_manager", None)
    last_stage = stage_manager is None or stage_manager.is_last_stage()
    tp_group = getattr(plugin, "tp_group", None)
    tp_rank0 = tp_group is None or dist.get_rank(tp_group) == 0
    return dp_group, dp_rank, dp_size, last_stage and tp_rank0


def _reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def train(cfg: TrainConfig) -> dict:
    model_path, model_config, tokenizer, data, evals = preflight(cfg)
    launch(seed=cfg.seed)
    try:
        return _train(cfg, model_path, model_config, tokenizer, data, evals)
    finally:
        _shutdown()


def _shutdown():
    """Release Booster objects and the process group before interpreter exit, where colossalai's leftovers would
    otherwise be collected after the modules they need are gone."""
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _train(cfg, model_path, model_config, tokenizer, data, evals) -> dict:
    from colossalai.booster import Booster

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if device_type() == "cuda" else torch.device("cpu")
    plugin = make_plugin(cfg.parallel())
    dp_group, dp_rank, dp_size, loss_rank = _group_info(plugin)
    torch.manual_seed(cfg.seed)

    per_step = cfg.batch_size * cfg.accumulation_steps
    steps_per_epoch = max(1, -(-sum(data.part_sizes) // dp_size) // per_step)
    total_steps = cfg.max_steps or steps_per_epoch * cfg.num_epochs
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(0.025 * total_steps)

    model = build_model(cfg, model_path)
    compute_dtype = DTYPES[cfg.mixed_precision]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.plugin == "ddp" and \
        cfg.mixed_precision == "bf16" else nullcontext()
    sampler, weights = make_sampler(cfg, data, evals, dp_rank, dp_size, device, compute_dtype, autocast)
    pruner = None
    if cfg.stage == "prune":
        from .prune_stage import PruneStage

        pruner = PruneStage(cfg, model, model_config, total_steps, device, dp_rank)
    teacher = load_teacher(cfg, device) if cfg.teacher else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(param_groups(params, cfg.weight_decay), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = warmup_cosine(optimizer, warmup, total_steps)
    booster = Booster(plugin=plugin, mixed_precision="fp16" if cfg.plugin == "ddp" and cfg.mixed_precision == "fp16"
                      else None)
    model, optimizer, _, _, scheduler = booster.boost(model, optimizer, lr_scheduler=scheduler)

    step, bad_run, skipped, tokens_seen = 0, 0, 0, 0
    if cfg.load_checkpoint and not ckpt.is_hf_model_dir(cfg.load_checkpoint):
        path = ckpt.resolve_checkpoint(cfg.load_checkpoint)
        state, rank_state = ckpt.load_checkpoint(booster, model, optimizer, path)
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(rank_state["sampler"])
        if pruner is not None:
            pruner.load_state_dict(state["pruner"])
        step, skipped, tokens_seen = state["step"], state["skipped"], state["tokens"]
    if cfg.save_dir and rank == 0:
        save_config(cfg, Path(cfg.save_dir) / "config.yaml")
    if cfg.config_file and rank == 0:
        save_config(cfg, Path(cfg.config_file))

    batches = Batches(data, sampler, cfg.batch_size)
    logger = RunLogger(cfg, total_steps, rank == 0, start_step=step)
    if weights is not None and step == 0:
        logger.scalars(0, {**{f"domain_reference/{c}": float(v) for c, v in zip(weights.categories, weights.reference)},
                           **{f"domain_weight/{c}": w for c, w in weights.as_dict().items()}})
    flops_token, peak = flops_per_token(model_config, data.max_length), peak_flops()
    pipeline = cfg.pp > 1
    history, last_eval = [], None

    def save(at):
        state = {"step": at, "scheduler": scheduler.state_dict(), "skipped": skipped, "tokens": tokens_seen}
        if pruner is not None:
            state["pruner"] = pruner.state_dict()
        ckpt.save_checkpoint(booster, model, optimizer, cfg.save_dir, at, state, {"sampler": sampler.state_dict()},
                             cfg.keep_last)

    model.train()
    end = min(total_steps, cfg.stop_at_step) if cfg.stop_at_step else total_steps
    while step < end:
        started = time.perf_counter()
        loss_sum, n_losses, step_tokens, finite, kd_sum = 0.0, 0, 0, True, 0.0
        for micro in range(cfg.accumulation_steps):
            batch = batches.next()
            inputs = model_inputs(batch, compute_dtype, device)
            step_tokens += int((batch["segment_ids"] < batch["num_docs"][:, None]).sum())
            sync = booster.no_sync(model, optimizer) if cfg.plugin == "ddp" and micro < cfg.accumulation_steps - 1 \
                else nullcontext()
            if pipeline:
                out = booster.execute_pipeline(iter([inputs]), model,
                                               lambda o, _: o.loss / cfg.accumulation_steps, optimizer,
                                               return_loss=True)
                loss = out["loss"] * cfg.accumulation_steps if out["loss"] is not None else None
            else:
                if pruner is not None:
                    pruner.before_forward(step, micro)
                with autocast:
                    loss, objective, kd = _objective(cfg, model, inputs, teacher, pruner, step)
                kd_sum += kd
                flag = torch.tensor([1.0 if torch.isfinite(objective).item() else 0.0], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                if flag.item() == 0:
                    finite = False
                    loss_sum, n_losses = loss_sum + float("nan"), n_losses + 1
                    continue  # every rank skips this backward together
                with sync:
                    booster.backward(objective / cfg.accumulation_steps, optimizer)
            if loss is not None and loss_rank:
                loss_sum += float(loss.detach())
                n_losses += 1
        loss_sum, n_losses, step_tokens = _reduce_sum([loss_sum, n_losses, step_tokens if loss_rank else 0], device)
        mean_loss = loss_sum / max(n_losses, 1)  # the mean of the micro-batch losses
        if pipeline and not math.isfinite(mean_loss):
            finite = False  # the pipeline schedule has already run backward: count it, cannot skip it
        grad_norm = None
        if finite:
            if cfg.plugin == "ddp":  # the other plugins clip inside their optimizer (max_norm)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf))
            optimizer.step()
            if grad_norm is None:
                grad_norm = optimizer.get_grad_norm()
            if pruner is not None:
                pruner.step()
            bad_run = 0
        else:
            skipped += 1
            bad_run += 1
            if pruner is not None:
                pruner.optimizer.zero_grad()
        optimizer.zero_grad()
        scheduler.step()
        step += 1
        tokens_seen += int(step_tokens)
        elapsed = time.perf_counter() - started
        tps = step_tokens / elapsed
        history.append(mean_loss)
        scalars = {
            "loss": mean_loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "tokens_per_s": tps,
            "mfu": tps * flops_token / (peak * world) if peak else None, "skipped_steps": skipped,
            "tokens": tokens_seen,
            "kd_loss": kd_sum / cfg.accumulation_steps if teacher is not None else None,
        }
        if pruner is not None:
            scalars.update(pruner.scalars(step))
        logger.step(step, scalars)
        if bad_run >= cfg.max_bad_steps:
            raise TrainingError(f"{bad_run} consecutive steps had a NaN/inf loss (step {step}): lower --lr, use "
                                "bf16 or fp32, or check the data; the last good checkpoint is in --save_dir")
        if evals is not None and cfg.eval_interval and step % cfg.eval_interval == 0:
            losses = last_eval = evaluate(cfg, booster, model, evals, plugin, compute_dtype, device, autocast, pruner)
            logger.eval(step, losses)
            if weights is not None:
                weights.update(losses)
                logger.scalars(step, {f"domain_weight/{c}": w for c, w in weights.as_dict().items()})
        if cfg.save_dir and cfg.save_interval and step % cfg.save_interval == 0:
            save(step)

    result = {"steps": step, "losses": history, "skipped": skipped}
    if cfg.save_dir and (not cfg.save_interval or step % cfg.save_interval):
        save(step)
    if step < total_steps:  # stopped early on request: the run continues from the checkpoint
        logger.close(result)
        return result
    if evals is not None and not (cfg.eval_interval and step % cfg.eval_interval == 0):  # else just evaluated
        last_eval = evaluate(cfg, booster, model, evals, plugin, compute_dtype, device, autocast, pruner)
        logger.eval(step, last_eval)
    if evals is not None:
        result["eval"] = last_eval
    if cfg.export_dir:
        export_dtype = compute_dtype if cfg.plugin != "ddp" else torch.float32
        transform = pruner.folder() if pruner is not None else None  # the pruned model: masks folded in
        ckpt.export_hf(booster, model, cfg.export_dir, model_config, tokenizer, export_dtype, cfg.overwrite, transform)
        result["export_dir"] = cfg.export_dir
    logger.close(result)
    return result


def _objective(cfg, model, inputs, teacher, pruner, step):
    """LM loss, and what is minimised: + kd_weight * distillation term, + the pruning Lagrangian."""
    out = model(**inputs)
    objective, kd = out.loss, 0.0
    if teacher is not None:
        with torch.no_grad():
            teacher_logits = teacher(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        kd_term = kd_loss(out.logits, teacher_logits, inputs["labels"], cfg.kd_temperature)
        kd = float(kd_term.detach())
        objective = objective + cfg.kd_weight * kd_term
    if pruner is not None:
        objective = objective + pruner.penalty(step)
    return out.loss, objective, kd


@torch.no_grad()
def evaluate(cfg, booster, model, evals, plugin, dtype, device, autocast, pruner=None) -> dict:
    """Held-out loss per category: token-weighted over each category's sequences, reduced over all ranks."""
    dp_group, dp_rank, dp_size, loss_rank = _group_info(plugin)
    return _evaluate(cfg, booster, model, evals, dtype, device, autocast, dp_rank, dp_size, loss_rank, pruner)


def _evaluate(cfg, booster, model, evals, dtype, device, autocast, dp_rank, dp_size, loss_rank, pruner=None):
    model.eval()
    if pruner is not None:
        pruner.train(False)  # deterministic masks
    categories = list(evals.dataset["category"])
    results = {}
    for cat in evals.categories:
        idx = [i for i, c in enumerate(categories) if c == cat]
        mine = idx[dp_rank::dp_size]
        total = [0.0, 0.0]
        # every rank runs the same number of batches so that collective ops inside the model line up
        n_batches = -(-len(idx) // (dp_size * cfg.batch_size))
        for b in range(n_batches):
            chunk = mine[b * cfg.batch_size : (b + 1) * cfg.batch_size] or idx[: cfg.batch_size]
            weight = 1.0 if b * cfg.batch_size < len(mine) else 0.0
            batch = collate(evals.dataset[chunk])
            inputs = model_inputs(batch, dtype, device)
            n_labels = int((batch["labels"][:, 1:] != -100).sum())
            if booster is not None and cfg.pp > 1:
                out = booster.execute_pipeline(iter([inputs]), model, lambda o, _: o.loss, None, return_loss=True)
                loss = out["loss"]
            else:
                with autocast:
                    loss = model(**inputs).loss
            if loss is not None and loss_rank:
                total[0] += weight * float(loss) * n_labels
                total[1] += weight * n_labels
        loss_sum, count = _reduce_sum(total, device)
        results[cat] = loss_sum / count if count else float("nan")
    model.train()
    if pruner is not None:
        pruner.train(True)
    return results


def make_sampler(cfg, data, evals, dp_rank, dp_size, device, dtype, autocast):
    """Bucket order by default; with --dynamic_loading, categories drawn by weights that evaluations move."""
    if not cfg.dynamic_loading:
        return BucketSampler(data.part_sizes, dp_rank, dp_size, seed=cfg.seed), None
    from colossal_shear.data.domain_weights import DomainSampler, DomainWeights, parse_reference_losses

    seq_categories = list(data.dataset["category"])
    counts = [seq_categories.count(c) for c in data.categories]
    if cfg.reference_loss:
        reference = parse_reference_losses(cfg.reference_loss)
    else:
        reference = reference_losses(cfg, evals, device, dtype, autocast, dp_rank, dp_size)
    weights = DomainWeights(data.categories, counts, reference)
    return DomainSampler(seq_categories, weights, dp_rank, dp_size, seed=cfg.seed), weights


def reference_losses(cfg, evals, device, dtype, autocast, dp_rank, dp_size) -> dict:
    """Eval loss per category of --reference_model (plain HF model on every rank, data split across ranks)."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(cfg.reference_model, torch_dtype=dtype, attn_implementation="sdpa",
                                               trust_remote_code=cfg.trust_remote_code).to(device)
    losses = _evaluate(cfg, None, ref, evals, dtype, device, autocast, dp_rank, dp_size, True)
    del ref
    return losses


def load_teacher(cfg, device):
    """The teacher runs without gradients in the student's precision (replicated on every rank)."""
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if cfg.plugin == "ddp" else DTYPES[cfg.mixed_precision]
    teacher = AutoModelForCausalLM.from_pretrained(cfg.teacher, torch_dtype=dtype, attn_implementation="sdpa",
                                                   trust_remote_code=cfg.trust_remote_code).to(device)
    teacher.eval().requires_grad_(False)
    return teacher
