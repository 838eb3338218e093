"""The trainer's configuration: one dataclass is the single source of truth for every flag, its default and its help.

Precedence: dataclass defaults < `--config FILE.yaml` < command-line flags. The effective config is saved beside the
checkpoints (`<save_dir>/config.yaml`) and, if `--config_file` is given, also there as JSON (Colossal-LLaMA-2 habit).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .plugins import PLUGINS, PRECISIONS, ParallelConfig


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # model and data
    pretrained: str = _f(None, "Hugging Face model directory to start from (config.json + weights + tokenizer)")
    dataset: list = _f(None, "prepared dataset(s): data-prep output directories or single part directories, "
                             "consumed in the order given (bucket order)", nargs="+")
    eval_dataset: list = _f(None, "prepared dataset(s) for held-out loss per category", nargs="+")
    max_length: int = _f(None, "sequence length; default: the dataset's max_length (must not exceed it or the "
                               "model's positions)")
    stage: str = _f("continue", "training stage: align (only embeddings + LM head train), prune "
                    "(learned L0 masks to --target_shape, then fold), continue, replay",
                    choices=("align", "prune", "continue", "replay"))
    # parallelism and precision
    plugin: str = _f("zero2", "Booster plugin", choices=PLUGINS)
    mixed_precision: str = _f("bf16", "training precision", choices=PRECISIONS)
    tp: int = _f(1, "tensor-parallel size (plugin 3d)")
    pp: int = _f(1, "pipeline-parallel size (plugin 3d)")
    sp: int = _f(1, "sequence-parallel size (plugin 3d, all-to-all)")
    zero_stage: int = _f(0, "ZeRO stage inside the 3d plugin (0, 1 or 2)")
    microbatch_size: int = _f(1, "pipeline micro-batch size (plugin 3d with pp > 1)")
    zero_cpu_offload: bool = _f(False, "offload optimizer states to CPU (zero2, gemini, 3d)")
    use_grad_checkpoint: bool = _f(False, "activation (gradient) checkpointing")
    use_flash_attn: bool = _f(False, "use flash_attention_2 (needs the flash-attn package); default SDPA")
    freeze_non_embeds_params: bool = _f(False, "train only the input embeddings and the LM head (align stage)")
    train_embeddings: str = _f("all", "align stage: train all rows of the embeddings and LM head, or only the rows "
                               "init_model.py added (new_rows.json / id_map.json; old rows stay bit-identical)",
                               choices=("all", "new"))
    # optimisation
    num_epochs: int = _f(1, "passes over the dataset")
    max_steps: int = _f(None, "length of the run in optimizer steps (default: num_epochs over the data)")
    stop_at_step: int = _f(None, "leave after this step (checkpoint saved), without ending the schedule: split a "
                                 "long run into jobs of limited wall time and resume each with --load_checkpoint")
    batch_size: int = _f(1, "sequences per device per micro-step")
    accumulation_steps: int = _f(1, "micro-steps per optimizer step")
    lr: float = _f(3e-4, "peak learning rate")
    weight_decay: float = _f(0.1, "AdamW weight decay")
    warmup_steps: int = _f(None, "linear warm-up steps (default: 2.5% of the steps)")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: off)")
    max_bad_steps: int = _f(10, "stop with an error after this many consecutive steps with a NaN/inf loss")
    seed: int = _f(42, "seed for data order, initialisation and dropout")
    # dynamic batch loading (Sheared-LLaMA): per-category sampling weights updated after each evaluation
    dynamic_loading: bool = _f(False, "sample each sequence's category by weights updated after every evaluation "
                                      "(needs --eval_dataset, --eval_interval and reference losses)")
    reference_loss: str = _f(None, "reference loss per category for dynamic loading: 'en=2.1,zh=3.0'")
    reference_model: str = _f(None, "compute the reference losses as this HF model's eval loss per category")
    # distillation (Minitron)
    teacher: str = _f(None, "HF model directory of a teacher: adds kd_weight * T^2 * KL(teacher || student)")
    kd_weight: float = _f(1.0, "weight of the distillation term")
    kd_temperature: float = _f(1.0, "distillation temperature T")
    # structured pruning (--stage prune)
    target_shape: str = _f(None, "prune stage: target 'hidden,heads,layers,intermediate[,kv_heads]' or a config.json "
                                 "/ HF model directory with the target shape")
    lag_lr: float = _f(1.0, "prune stage: learning rate of the Lagrangian multipliers (gradient ascent)")
    mask_lr: float = _f(1.0, "prune stage: learning rate of the masks' log_alpha")
    mask_init: float = _f(5.0, "prune stage: initial log_alpha of every mask (5: all kept)")
    lagrangian_warmup_steps: int = _f(None, "prune stage: steps over which the target shape ramps in (default 20%)")
    # checkpoints, logs, export
    save_dir: str = _f(None, "directory for resumable checkpoints (step-NNNNNNN/ + latest)")
    save_interval: int = _f(1000, "save a checkpoint every N optimizer steps (and at the end)")
    keep_last: int = _f(2, "keep only the newest K checkpoints")
    load_checkpoint: str = _f(None, "resume from a checkpoint directory (or save_dir: its latest), or load only "
                                    "weights from a Hugging Face model directory")
    export_dir: str = _f(None, "write the final plain Hugging Face model + tokenizer here")
    overwrite: bool = _f(False, "allow writing into a non-empty export_dir / a save_dir from another run")
    tensorboard_dir: str = _f(None, "tensorboard log directory")
    config_file: str = _f(None, "also write the effective config to this JSON file")
    log_interval: int = _f(1, "steps between log lines (tensorboard gets every step)")
    eval_interval: int = _f(0, "evaluate every N steps (0: only at the end, if --eval_dataset)")
    config: str = _f(None, "YAML file holding any of these options; flags given on the command line override it")
    trust_remote_code: bool = _f(False, "allow custom model code from the model directory (off: never executed)")

    def parallel(self) -> ParallelConfig:
        return ParallelConfig(
            plugin=self.plugin,
            mixed_precision=self.mixed_precision,
            tp=self.tp,
            pp=self.pp,
            sp=self.sp,
            zero_stage=self.zero_stage,
            microbatch_size=self.microbatch_size,
            zero_cpu_offload=self.zero_cpu_offload,
            grad_clip=self.grad_clip,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _arg_type(f: dataclasses.Field):
    hint = f.type if not isinstance(f.type, str) else f.type
    name = str(hint)
    if "bool" in name:
        return None
    if "int" in name:
        return int
    if "float" in name:
        return float
    return str


def build_parser(cls=TrainConfig, description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        help_ = meta.pop("help", "")
        kind = _arg_type(f)
        if kind is None:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=f"{help_} (default: {f.default})")
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=argparse.SUPPRESS,
                                help=f"{help_} (default: {f.default})", **meta)
    return parser


def parse_config(argv: typing.Sequence[str] | None = None, cls=TrainConfig, description: str = ""):
    """Defaults, then the YAML file, then the flags actually given."""
    given = vars(build_parser(cls, description).parse_args(argv))
    values = {}
    if given.get("config"):
        values.update(load_yaml(given["config"], cls))
    values.update(given)
    return cls(**values)


def load_yaml(path: str, cls=TrainConfig) -> dict:
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise SystemExit(f"--config {path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"--config {path}: expected a mapping of option: value, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SystemExit(f"--config {path}: unknown option(s) {', '.join(unknown)}")
    for key in ("dataset", "eval_dataset"):
        if isinstance(data.get(key), str):
            data[key] = [data[key]]
    return data


def save_config(cfg, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    if path.suffix == ".json":
        tmp.write_text(json.dumps(cfg.to_dict(), indent=2))
    else:
        tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tmp.replace(path)
