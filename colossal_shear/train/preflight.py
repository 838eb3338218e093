"""Every check that can fail on user input, run on every rank before the process group does any work: a bad flag,
path or dataset is one line and exit 2, never a traceback from inside a collective."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from colossal_shear.core.errors import TrainingError
from colossal_shear.data.prepared import PreparedData, open_prepared
from colossal_shear.models.registry import adapter_for
from colossal_shear.train.config import TrainConfig
from colossal_shear.train.distributed.plugins import check_parallel_config
from colossal_shear.train.io import checkpoint as ckpt
from colossal_shear.train.model import attention_implementation
from colossal_shear.train.stages.freeze import check_train_embeddings


@dataclass
class Inputs:
    """What preflight opened and checked: where the weights come from, their config and tokenizer, the data."""

    model_path: str
    model_config: object
    tokenizer: object
    data: PreparedData
    evals: PreparedData | None


def preflight(cfg: TrainConfig) -> Inputs:
    """Everything that can be checked from the files and flags alone, before any process group work."""
    from transformers import AutoConfig, AutoTokenizer

    where, model = cfg.checkpoint, cfg.model
    from_checkpoint = where.load_checkpoint and ckpt.is_hf_model_dir(where.load_checkpoint)
    if not model.pretrained and not from_checkpoint:
        raise TrainingError("--pretrained is required (a Hugging Face model directory)")
    if not cfg.data.dataset:
        raise TrainingError("--dataset is required (a data-prep output directory or part)")
    model_path = where.load_checkpoint if from_checkpoint else model.pretrained
    if not (Path(model_path) / "config.json").is_file():
        raise TrainingError(f"--pretrained {model_path}: no config.json (not a Hugging Face model directory)")
    model_config = AutoConfig.from_pretrained(model_path, trust_remote_code=model.trust_remote_code)
    adapter_for(model_config, f"--pretrained {model_path}")  # an unsupported family: one line, before anything runs
    check_parallel_config(cfg.parallel, world_size=int(os.environ.get("WORLD_SIZE", 1)), model_config=model_config)
    attention_implementation(cfg)  # refuses flash/flex where they cannot run, before any process group work
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=model.trust_remote_code)
    train = open_prepared(cfg.data.dataset, tokenizer, None, model_config.max_position_embeddings)
    evals = open_prepared(cfg.data.eval_dataset, tokenizer, train.max_length) if cfg.data.eval_dataset else None
    _check_outputs(cfg)
    _check_stage_options(cfg, model_config, train, evals)
    try:
        check_train_embeddings(cfg, model_path, model_config)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    par, batch_size = cfg.parallel, cfg.optim.batch_size
    if par.pipeline and batch_size % par.microbatch_size:
        raise TrainingError(f"--batch_size {batch_size} must be a multiple of --microbatch_size {par.microbatch_size}")
    return Inputs(model_path, model_config, tokenizer, train, evals)


def _check_outputs(cfg: TrainConfig) -> None:
    """Every output directory writable, and none holding another run's files unless --overwrite."""
    where = cfg.checkpoint
    for flag, value in (
        ("save_dir", where.save_dir),
        ("tensorboard_dir", cfg.log.tensorboard_dir),
        ("export_dir", where.export_dir),
    ):
        if value:
            _check_writable(Path(value), f"--{flag}")
    if (
        where.save_dir
        and not where.load_checkpoint
        and not where.overwrite
        and (Path(where.save_dir) / ckpt.LATEST).exists()
    ):
        raise TrainingError(
            f"--save_dir {where.save_dir} already holds checkpoints of another run: resume with "
            f"--load_checkpoint {where.save_dir}, or pass --overwrite"
        )
    export = where.export_dir
    if export and not where.overwrite and Path(export).is_dir() and any(Path(export).iterdir()):
        raise TrainingError(f"--export_dir {export} exists and is not empty (pass --overwrite)")


def _check_stage_options(cfg: TrainConfig, model_config, train, evals) -> None:
    if cfg.stage == "prune":
        _check_prune(cfg, model_config)
    if cfg.data.dynamic_loading:
        _check_dynamic_loading(cfg, train, evals)
    teacher = None if cfg.distill.from_parent else cfg.distill.teacher  # the parent: the model itself
    for flag, path in (("teacher", teacher), ("reference_model", cfg.data.reference_model)):
        if path and not (Path(path) / "config.json").is_file():
            raise TrainingError(f"--{flag} {path}: no config.json (not a Hugging Face model directory)")
    if teacher:
        from transformers import AutoConfig

        if cfg.parallel.pipeline:
            raise TrainingError(
                "--teacher is not supported with --pp > 1 (the student's logits live on the last stage)"
            )
        t = AutoConfig.from_pretrained(teacher, trust_remote_code=cfg.model.trust_remote_code)
        if t.vocab_size != model_config.vocab_size:
            raise TrainingError(
                f"--teacher vocab size {t.vocab_size} differs from the model's "
                f"{model_config.vocab_size}: distillation compares logits token by token"
            )


def _check_prune(cfg: TrainConfig, model_config) -> None:
    from colossal_shear.pruning.shape import PruneShape

    target = cfg.prune.target_shape
    if not target:
        raise TrainingError(
            "--stage prune needs --target_shape (hidden,heads,layers,intermediate[,kv_heads] or a config.json)"
        )
    try:
        PruneShape.parse(target, model_config).validate_against(PruneShape.from_config(model_config))
    except (ValueError, FileNotFoundError) as e:
        raise TrainingError(f"--target_shape: {e}") from None
    if cfg.parallel.plugin == "3d":
        raise TrainingError(
            "--stage prune runs under ddp, zero2, zero2_cpu or gemini: the 3d plugin's shardformer "
            "replaces the modules the masks hook into, and tp/pp split heads and layers across ranks"
        )
    if cfg.parallel.mixed_precision == "fp16":
        raise TrainingError("--stage prune needs bf16 or fp32: fp16 loss scaling would scale the masks' gradients")
    if not cfg.checkpoint.export_dir:
        raise TrainingError("--stage prune needs --export_dir: the pruned model is folded and written there")


def _check_dynamic_loading(cfg: TrainConfig, train, evals) -> None:
    data = cfg.data
    if evals is None or not cfg.log.eval_interval:
        raise TrainingError("--dynamic_loading needs --eval_dataset and --eval_interval (weights move after evals)")
    if bool(data.reference_loss) == bool(data.reference_model):
        raise TrainingError("--dynamic_loading needs exactly one of --reference_loss or --reference_model")
    missing = [c for c in train.categories if c not in evals.categories]
    if missing:
        raise TrainingError(
            f"--eval_dataset has no sequences of categor{'ies' if len(missing) > 1 else 'y'} "
            f"{', '.join(missing)}, which dynamic loading needs to weigh"
        )
    if data.reference_loss:
        from colossal_shear.data.domain_weights import parse_reference_losses

        given = parse_reference_losses(data.reference_loss)
        if sorted(given) != sorted(train.categories):
            raise TrainingError(
                f"--reference_loss names {sorted(given)}; the dataset's categories are {sorted(train.categories)}"
            )


def _check_writable(path: Path, flag: str) -> None:
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise TrainingError(f"{flag} {path}: {probe} is not a writable directory")
