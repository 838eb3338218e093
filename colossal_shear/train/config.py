"""The trainer's options: `TrainConfig` is the single source of truth for every flag of train.py, its type, default
and help (colossal_shear.core.config derives argparse, YAML and docs/cli.md from it). Besides the run's `stage` and
`seed` its options sit in sections, each a dataclass declared once and handed to the component it configures:

    model       what is loaded and how it is built (model.py)
    data        the datasets and how they are sampled (batches.py, dynamic loading)
    optim       the schedule and the optimizer: batch sizes, steps, learning rate (trainer.py, optim.py)
    parallel    plugin, precision and parallel layout (distributed/plugins.py, engine.py)
    prune       the prune stage's masks and Lagrangian (stages/prune.py)
    distill     the teacher and the distillation term (stages/distill.py)
    checkpoint  checkpoints, resuming and the export (io/checkpoint.py, io/export.py)
    log         tensorboard, log lines and evaluations (io/run_logger.py)

Flags stay flat (`--lr`); YAML takes a section's options under its name (`optim: {lr: 1e-4}`, as saved) or at the top
level (`lr: 1e-4`, as written before sections existed). The effective config is saved beside the checkpoints
(`<save_dir>/config.yaml`); passed back with `--config` it reproduces the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from colossal_shear.core.config import option, option_section, to_yaml
from colossal_shear.core.constants import PRECISIONS
from colossal_shear.core.fsutil import atomic_write_text

STAGES = ("align", "prune", "continue", "replay")
PLUGINS = ("gemini", "gemini_auto", "zero2", "zero2_cpu", "3d", "ddp")
PARENT_TEACHER = "parent"  # --teacher parent
# the plugins under which the prune stage can run its model a second time, without gradients, between a forward and
# its backward (Gemini's no-grad forward scatters its chunks and resets the record of the training forward that its
# backward follows)
PARENT_TEACHER_PLUGINS = ("ddp", "zero2", "zero2_cpu")


def _at_least(cfg, minimum: int, *names: str) -> None:
    """ValueError naming the flag when an option (None allowed) is below `minimum`."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < minimum:
            raise ValueError(f"--{name} must be at least {minimum}, got {value}")


def _not_negative(cfg, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < 0:
            raise ValueError(f"--{name} must not be negative, got {value}")


@dataclass
class ModelConfig:
    """What is trained and how it is built."""

    pretrained: str | None = option(
        None, "Hugging Face model directory to start from (config.json + weights + tokenizer)"
    )
    train_embeddings: str = option(
        "all",
        "align stage: train all rows of the embeddings and LM head, or only the "
        "rows init_model.py added (new_rows.json / id_map.json; the old rows stay "
        "bit-identical)",
        choices=("all", "new"),
    )
    use_grad_checkpoint: bool = option(False, "activation (gradient) checkpointing")
    attn_implementation: str = option(
        "auto",
        "attention kernel for packed documents: sdpa (dense block-causal "
        "mask for packed rows), flex (FlexAttention document mask; GPU), flash "
        "(flash_attention_2 with position ids restarting per document; GPU + "
        "flash-attn); auto: flash when installed, else flex on a GPU, sdpa on CPU and "
        "under --plugin 3d",
        choices=("auto", "sdpa", "flex", "flash"),
        const_flags={"--use_flash_attn": "flash"},
    )
    lm_loss: str = option(
        "chunked",
        "chunked: the LM (and distillation) loss computed chunk by chunk over the LM "
        "head, never holding the full fp32 logits; full: the model's own loss over whole logits "
        "(3d with tp/pp always uses shardformer's vocabulary-parallel loss)",
        choices=("chunked", "full"),
    )
    compile: bool = option(
        False,
        "torch.compile the model (model.compile() before boosting; not with gemini, "
        "whose chunked parameters dynamo cannot trace)",
    )
    trust_remote_code: bool = option(False, "allow custom model code from the model directory (off: never executed)")


@dataclass
class DataConfig:
    """The prepared datasets, and how sequences are drawn from them (bucket order, or dynamic batch loading as in
    Sheared-LLaMA: per-category sampling weights updated after each evaluation)."""

    dataset: list[str] | None = option(
        None,
        "prepared dataset(s): data-prep output directories or single part "
        "directories, consumed in the order given (bucket order)",
    )
    eval_dataset: list[str] | None = option(None, "prepared dataset(s) for held-out loss per category")
    dynamic_loading: bool = option(
        False,
        "sample each sequence's category by weights updated after every "
        "evaluation (needs --eval_dataset, --eval_interval and reference losses)",
    )
    reference_loss: str | None = option(None, "reference loss per category for dynamic loading: 'en=2.1,zh=3.0'")
    reference_model: str | None = option(None, "compute the reference losses as this HF model's eval loss per category")


@dataclass
class OptimConfig:
    """The length of the run, the batch and the optimizer."""

    num_epochs: int = option(1, "passes over the dataset")
    max_steps: int | None = option(None, "length of the run in optimizer steps (default: num_epochs over the data)")
    batch_size: int = option(1, "sequences per device per micro-step")
    accumulation_steps: int = option(1, "micro-steps per optimizer step")
    lr: float = option(3e-4, "peak learning rate")
    weight_decay: float = option(0.1, "AdamW weight decay")
    warmup_steps: int | None = option(None, "linear warm-up steps", default_text="2.5% of the steps")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: off)")
    max_bad_steps: int = option(
        10, "stop with an error after this many consecutive skipped steps (NaN/inf loss or gradient norm)"
    )

    def __post_init__(self):
        _at_least(self, 1, "num_epochs", "batch_size", "accumulation_steps", "max_bad_steps", "max_steps")
        _not_negative(self, "warmup_steps", "lr", "weight_decay", "grad_clip")


@dataclass
class ParallelConfig:
    """How the model is spread over the processes."""

    plugin: str = option("zero2", "Booster plugin", choices=PLUGINS)
    mixed_precision: str = option("bf16", "training precision", choices=PRECISIONS)
    tp: int = option(1, "tensor-parallel size (plugin 3d)")
    pp: int = option(1, "pipeline-parallel size (plugin 3d)")
    sp: int = option(1, "sequence-parallel size (plugin 3d, all-to-all)")
    zero_stage: int = option(0, "ZeRO stage inside the 3d plugin (0, 1 or 2)", choices=(0, 1, 2))
    microbatch_size: int = option(1, "pipeline micro-batch size (plugin 3d with pp > 1)")
    zero_cpu_offload: bool = option(False, "offload optimizer states to CPU (zero2, gemini, 3d)")

    @property
    def pipeline(self) -> bool:
        return self.pp > 1


@dataclass
class PruneConfig:
    """Structured pruning (--stage prune): learned hard-concrete masks driven to a target shape, then folded."""

    target_shape: str | None = option(
        None,
        "prune stage: target 'hidden,heads,layers,intermediate[,kv_heads]' or a "
        "config.json / HF model directory with the target shape",
    )
    lag_lr: float = option(
        0.2,
        "prune stage: peak learning rate of the Lagrangian multipliers (gradient ascent; the --lr schedule scales it)",
    )
    mask_lr: float = option(
        1.0, "prune stage: peak learning rate of the masks' log_alpha (the --lr schedule scales it)"
    )
    mask_init: float = option(
        3.0,
        "prune stage: initial log_alpha of every mask (3: 80% of sampled gates exactly 1; "
        "log_alpha is kept in [ln 0.01, ln 100])",
    )
    mask_init_from: str = option(
        "constant",
        "prune stage: constant: every mask starts at --mask_init; importance: "
        "Minitron activation importance on the first dataset orders them "
        "around it (+- --mask_init_spread)",
        choices=("constant", "importance"),
    )
    mask_init_spread: float = option(
        2.0,
        "prune stage: with --mask_init_from importance, the most / least important unit starts at mask_init +- this",
    )
    lagrangian_warmup_steps: int | None = option(
        None, "prune stage: steps over which the target shape ramps in", default_text="40% of the steps, at least 30"
    )

    def __post_init__(self):
        _not_negative(self, "lagrangian_warmup_steps")


@dataclass
class DistillConfig:
    """Distillation (Minitron) from a teacher of the same vocabulary."""

    teacher: str | None = option(
        None,
        "HF model directory of a teacher: the loss becomes lm_weight * LM + kd_weight * T^2 * KL(teacher || student); "
        "'parent' (--stage prune only): the model being pruned with every gate open, no second copy of the weights",
    )
    kd_weight: float = option(1.0, "weight of the distillation term")
    kd_temperature: float = option(1.0, "distillation temperature T")
    lm_weight: float = option(
        1.0,
        "weight of the LM loss in the objective (0 with a teacher: KL only, as Minitron; the logged loss is the LM's)",
    )

    def __post_init__(self):
        _not_negative(self, "kd_weight", "lm_weight")
        if self.kd_temperature <= 0:
            raise ValueError(f"--kd_temperature must be positive, got {self.kd_temperature}")
        if self.lm_weight == 0 and not self.teacher:
            raise ValueError("--lm_weight 0 needs a --teacher: without one nothing would be trained")

    @property
    def from_parent(self) -> bool:
        """--teacher parent: the prune stage's own model with its masks bypassed (stages/distill.py)."""
        return self.teacher == PARENT_TEACHER


@dataclass
class CheckpointConfig:
    """Resumable checkpoints, where a run resumes from, when it stops, and the final export."""

    save_dir: str | None = option(None, "directory for resumable checkpoints (step-NNNNNNN/ + latest + config.yaml)")
    save_interval: int = option(1000, "save a checkpoint every N optimizer steps (and at the end)")
    keep_last: int = option(2, "keep only the newest K checkpoints")
    load_checkpoint: str | None = option(
        None,
        "resume from a checkpoint directory (or save_dir: its latest), or "
        "load only weights from a Hugging Face model directory",
    )
    stop_at_step: int | None = option(
        None,
        "leave after this step (checkpoint saved), without ending the schedule: "
        "split a long run into jobs of limited wall time and resume each with "
        "--load_checkpoint",
    )
    export_dir: str | None = option(None, "write the final plain Hugging Face model + tokenizer here")
    overwrite: bool = option(False, "allow writing into a non-empty export_dir / a save_dir from another run")

    def __post_init__(self):
        _at_least(self, 1, "stop_at_step")
        _not_negative(self, "save_interval", "keep_last")


@dataclass
class LogConfig:
    """What the run reports, and when it evaluates."""

    tensorboard_dir: str | None = option(None, "tensorboard log directory")
    log_interval: int = option(1, "steps between log lines (tensorboard gets every step)")
    eval_interval: int = option(0, "evaluate every N steps (0: only at the end, if --eval_dataset)")

    def __post_init__(self):
        _at_least(self, 1, "log_interval")
        _not_negative(self, "eval_interval")


@dataclass
class TrainConfig:
    """One stage of training under a ColossalAI Booster plugin (launched by `colossalai run` or `torchrun`)."""

    stage: str = option(
        "continue",
        "align: only the input embeddings and LM head train; prune: learned L0 masks to "
        "--target_shape, then folded; continue: full continual pretraining; replay: the same as "
        "continue (names the knowledge-replay stage in logs and the report)",
        choices=STAGES,
        const_flags={"--freeze_non_embeds_params": "align"},
    )
    seed: int = option(42, "seed for data order, initialisation and dropout")
    model: ModelConfig = option_section(ModelConfig, "what is trained and how it is built")
    data: DataConfig = option_section(DataConfig, "the datasets and how they are sampled")
    optim: OptimConfig = option_section(OptimConfig, "run length, batch and optimizer")
    parallel: ParallelConfig = option_section(ParallelConfig, "plugin, precision and parallel layout")
    prune: PruneConfig = option_section(PruneConfig, "the prune stage (--stage prune)")
    distill: DistillConfig = option_section(DistillConfig, "distillation from a teacher")
    checkpoint: CheckpointConfig = option_section(CheckpointConfig, "checkpoints, resuming and export")
    log: LogConfig = option_section(LogConfig, "logs and evaluations")

    def __post_init__(self):
        if self.model.compile and self.parallel.plugin.startswith("gemini"):
            raise ValueError(
                f"--compile cannot be used with --plugin {self.parallel.plugin}: torch.compile fails in "
                "dynamo on Gemini's chunked parameters (InternalTorchDynamoError); use zero2 or ddp"
            )
        if self.distill.from_parent:
            if self.stage != "prune":
                raise ValueError(
                    f"--teacher parent works with --stage prune only (the parent is the pruned model with every gate "
                    f"open); --stage {self.stage} needs a teacher directory"
                )
            if self.parallel.plugin not in PARENT_TEACHER_PLUGINS:
                raise ValueError(
                    f"--teacher parent cannot run under --plugin {self.parallel.plugin} (a second forward without "
                    f"gradients before the backward); use {', '.join(PARENT_TEACHER_PLUGINS)}"
                )

    @property
    def freezes_body(self) -> bool:
        """The align stage trains only the input embeddings and the LM head (Colossal-LLaMA-2's
        --freeze_non_embeds_params, kept as an alias of --stage align)."""
        return self.stage == "align"


def save_config(cfg: TrainConfig, path: Path, step: int = 0) -> None:
    """The effective config, nested by section (older flat files load too: core.config.load_yaml). A config.yaml
    already there that says otherwise (a resume that changed options) is kept first as
    `config-history/until-step-NNNNNNN.yaml`: the history of what the run used."""
    path, text = Path(path), to_yaml(cfg)
    if path.is_file() and _settings(path.read_text(encoding="utf-8")) != _settings(text):
        atomic_write_text(path.parent / "config-history" / f"until-step-{step:07d}.yaml", path.read_text("utf-8"))
    atomic_write_text(path, text)


# where a job starts and stops, not how the run trains: a resume that changes only these has no history to keep
RUN_CONTROL = ("load_checkpoint", "stop_at_step")


def _settings(text: str) -> dict:
    import yaml

    def flat(node: dict) -> dict:
        out = {}
        for key, value in node.items():
            out.update(flat(value) if isinstance(value, dict) else {key: value})
        return out

    return {k: v for k, v in flat(yaml.safe_load(text) or {}).items() if k not in RUN_CONTROL}
