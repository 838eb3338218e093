"""The one typed configuration system: every CLI's flags, YAML and docs come from its dataclass, values are converted
to the field's type from both sources, and a user error is one line (once per job, exit 2)."""

import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, run_distributed

from colossal_shear import cli
from colossal_shear.core.config import ConfigError, flat_fields, parse, to_yaml
from colossal_shear.core.errors import UserError
from colossal_shear.data.config import PrepareConfig
from colossal_shear.train.config import TrainConfig


@pytest.mark.parametrize("script", list(cli.CLIS))
def test_help_works_for_every_cli(script):
    cmd = ["-m", script[:-3].replace("/", ".")] if script.startswith("colossal_shear/") else [str(ROOT / script)]
    proc = subprocess.run([sys.executable, *cmd, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for f in flat_fields(cli.CLIS[script]):
        assert f"--{f.name}" in proc.stdout
    assert "--config" in proc.stdout


def test_help_is_shown_once_per_job():
    """Every process of a launch parses its flags: only rank 0 shows --help (rank 1 of 2 exits 0, silently)."""
    env = {**os.environ, "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stderr
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--help"],
        capture_output=True,
        text=True,
        env={**env, "RANK": "0", "LOCAL_RANK": "0"},
    )
    assert proc.returncode == 0 and proc.stdout.startswith("usage: train.py"), proc.stderr


def test_docs_cli_md_is_generated_from_the_dataclasses():
    assert (ROOT / "docs" / "cli.md").read_text() == cli.cli_docs(), (
        "docs/cli.md is stale: python -m colossal_shear.cli > docs/cli.md"
    )


def test_readme_names_only_flags_that_exist():
    """The README explains flags in prose; every `--flag` it names must be a real option of some CLI (or of the
    launchers and tools it shows)."""
    known = {f"--{f.name}" for s in cli.CLIS for f in flat_fields(cli.CLIS[s])}
    for s in cli.CLIS:
        for f in flat_fields(cli.CLIS[s]):
            known |= set(f.meta.get("aliases", ())) | set(f.meta.get("const_flags", {}))
            if f.hint is bool:
                known.add(f.meta.get("negative") or f"--no_{f.name}")
    known |= {
        "--config",
        "--help",
        "--nproc_per_node",
        "--hostfile",
        "--master_addr",
        "--master_port",
        "--standalone",
        "--report",
        "--ssh-port",
        "--index-url",
        "--no-deps",
        "--dry_run",
        "--steps",
        "--include",
        "--exclude",
        "--fix",
        # torchrun's and colossalai run's shutdown and signal options, sbatch's (README, "Preemption")
        "--shutdown_timeout",
        "--signals_to_handle",
        "--extra_launch_args",
        "--signal",
        "--requeue",
        "--open-mode",
        "--nodes",
        "--gpus-per-node",
        "--time",
    }
    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", readme))
    assert named <= known, f"README names flags no CLI has: {sorted(named - known)}"


def test_yaml_values_are_converted_to_the_fields_types(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(
        "lr: 1e-3\nmax_steps: '3'\nbatch_size: 2.0\noverwrite: yes\ndataset: data/a\n"
        "parallel:\n  plugin: ddp\n  tp: '1'\ntensorboard_dir: ~\nmixed_precision: fp32\n"
    )
    cfg = parse(TrainConfig, ["--config", cfg_file])
    assert (cfg.optim.lr, cfg.optim.max_steps, cfg.optim.batch_size) == (1e-3, 3, 2)
    assert (cfg.checkpoint.overwrite, cfg.data.dataset) == (True, ["data/a"])
    assert (cfg.parallel.plugin, cfg.parallel.tp, cfg.parallel.mixed_precision) == ("ddp", 1, "fp32")
    assert cfg.log.tensorboard_dir is None
    # flags override YAML, and are converted the same way
    cfg = parse(TrainConfig, ["--config", cfg_file, "--lr", "2e-4", "--tp", "2", "--no_overwrite"])
    assert (cfg.optim.lr, cfg.parallel.tp, cfg.checkpoint.overwrite) == (2e-4, 2, False)
    # the saved YAML round-trips
    saved = tmp_path / "saved.yaml"
    saved.write_text(to_yaml(cfg))
    assert parse(TrainConfig, ["--config", saved]) == cfg


# The config.yaml a run saved before TrainConfig had sections (commit 8affc18: every option a top-level key but the
# parallel ones), for `--pretrained /models/tiny --dataset /data/a /data/b --freeze_non_embeds_params --plugin ddp
# --mixed_precision fp32 --batch_size 2 --max_steps 3 --lr 3e-3 --save_dir /runs/x/ckpt --tensorboard_dir /runs/x/tb
# --teacher /models/teacher --kd_weight 0.5`.
FLAT_CONFIG_YAML = """\
pretrained: /models/tiny
dataset:
- /data/a
- /data/b
eval_dataset: null
stage: align
parallel:
  plugin: ddp
  mixed_precision: fp32
  tp: 1
  pp: 1
  sp: 1
  zero_stage: 0
  microbatch_size: 1
  zero_cpu_offload: false
train_embeddings: all
use_grad_checkpoint: false
attn_implementation: auto
lm_loss: chunked
compile: false
num_epochs: 1
max_steps: 3
stop_at_step: null
batch_size: 2
accumulation_steps: 1
lr: 0.003
weight_decay: 0.1
warmup_steps: null
grad_clip: 1.0
max_bad_steps: 10
seed: 42
dynamic_loading: false
reference_loss: null
reference_model: null
teacher: /models/teacher
kd_weight: 0.5
kd_temperature: 1.0
target_shape: null
mask_lr: 1.0
mask_init: 3.0
mask_init_from: constant
mask_init_spread: 2.0
target_ramp_steps: null
mask_harden_steps: null
save_dir: /runs/x/ckpt
save_interval: 1000
keep_last: 2
load_checkpoint: null
export_dir: null
overwrite: false
tensorboard_dir: /runs/x/tb
log_interval: 1
eval_interval: 0
trust_remote_code: false
"""
FLAT_CONFIG_FLAGS = [
    "--pretrained",
    "/models/tiny",
    "--dataset",
    "/data/a",
    "/data/b",
    "--freeze_non_embeds_params",
    "--plugin",
    "ddp",
    "--mixed_precision",
    "fp32",
    "--batch_size",
    "2",
    "--max_steps",
    "3",
    "--lr",
    "3e-3",
    "--save_dir",
    "/runs/x/ckpt",
    "--tensorboard_dir",
    "/runs/x/tb",
    "--teacher",
    "/models/teacher",
    "--kd_weight",
    "0.5",
]


def test_a_flat_config_yaml_of_the_previous_version_still_loads(tmp_path):
    old = tmp_path / "config.yaml"
    old.write_text(FLAT_CONFIG_YAML)
    cfg = parse(TrainConfig, ["--config", old])
    assert cfg == parse(TrainConfig, FLAT_CONFIG_FLAGS)
    assert (cfg.stage, cfg.optim.lr, cfg.optim.batch_size, cfg.data.dataset) == (
        "align",
        3e-3,
        2,
        ["/data/a", "/data/b"],
    )
    assert (cfg.distill.teacher, cfg.distill.kd_weight, cfg.checkpoint.save_dir) == (
        "/models/teacher",
        0.5,
        "/runs/x/ckpt",
    )
    # saved again it is nested by section, and loads to the same config
    resaved = tmp_path / "resaved.yaml"
    resaved.write_text(to_yaml(cfg))
    assert parse(TrainConfig, ["--config", resaved]) == cfg


def test_saved_config_is_nested_by_section(tmp_path):
    import yaml

    saved = yaml.safe_load(to_yaml(parse(TrainConfig, FLAT_CONFIG_FLAGS)))
    assert list(saved) == [
        "stage",
        "seed",
        "model",
        "data",
        "optim",
        "parallel",
        "prune",
        "distill",
        "checkpoint",
        "log",
    ]
    assert saved["optim"]["lr"] == 3e-3 and saved["parallel"]["plugin"] == "ddp" and saved["log"]["log_interval"] == 1
    assert {k for section in saved.values() if isinstance(section, dict) for k in section} == {
        f.name for f in flat_fields(TrainConfig) if f.section
    }


def test_nested_flat_and_mixed_yaml_give_the_same_config(tmp_path):
    nested, flat, mixed = tmp_path / "nested.yaml", tmp_path / "flat.yaml", tmp_path / "mixed.yaml"
    nested.write_text(
        "stage: align\nmodel:\n  pretrained: m\n  use_flash_attn: true\ndata:\n  dataset: [d]\n"
        "optim:\n  lr: 1e-4\n  accumulation_steps: '4'\ncheckpoint:\n  save_dir: s\n  overwrite: yes\n"
        "log:\n  eval_interval: 5\nprune: {}\ndistill:\n"
    )
    flat.write_text(
        "freeze_non_embeds_params: true\npretrained: m\nuse_flash_attn: true\ndataset: d\nlr: 1e-4\n"
        "accumulation_steps: 4\nsave_dir: s\noverwrite: true\neval_interval: 5\n"
    )
    mixed.write_text(
        "stage: align\nmodel: {pretrained: m}\nuse_flash_attn: true\ndataset: d\noptim: {lr: 1e-4}\n"
        "accumulation_steps: 4\ncheckpoint: {save_dir: s}\noverwrite: on\nlog: {eval_interval: 5}\n"
    )
    cfg = parse(TrainConfig, ["--config", nested])
    assert cfg == parse(TrainConfig, ["--config", flat]) == parse(TrainConfig, ["--config", mixed])
    assert (cfg.stage, cfg.model.attn_implementation, cfg.optim.lr, cfg.optim.accumulation_steps) == (
        "align",
        "flash",
        1e-4,
        4,
    )
    assert (cfg.checkpoint.save_dir, cfg.checkpoint.overwrite, cfg.log.eval_interval) == ("s", True, 5)
    # flags still override a nested YAML
    assert parse(TrainConfig, ["--config", nested, "--lr", "2e-4"]).optim.lr == 2e-4


@pytest.mark.parametrize(
    "text, match",
    [
        ("lr: fast\n", r"run.yaml: lr: expected float, got 'fast'"),
        ("max_steps: 2.5\n", r"run.yaml: max_steps: expected int, got 2.5"),
        ("overwrite: maybe\n", r"run.yaml: overwrite: expected bool, got 'maybe'"),
        ("plugin: fsdp\n", r"run.yaml: plugin: 'fsdp' is not one of gemini, gemini_auto, zero2"),
        ("learning_rate: 1\n", r"run.yaml: unknown option 'learning_rate'"),
        ("parallel:\n  lr: 1\n", r"run.yaml: unknown option parallel.lr \(lr belongs under optim\)"),
        ("optim:\n  lrr: 1\n", r"run.yaml: unknown option optim.lrr \(did you mean 'lr'\?\)"),
        ("optm:\n  lr: 1\n", r"run.yaml: unknown option 'optm' \(did you mean 'optim'\?\)"),
        ("optim: 3\n", r"run.yaml: optim: expected a mapping of option: value, got int"),
        ("lr: 1\noptim:\n  lr: 2\n", r"run.yaml: lr is given twice \(at the top level and under optim\)"),
        ("optim:\n  lr: fast\n", r"run.yaml: lr: expected float, got 'fast'"),
        ("log:\n  log_interval: 0\n", r"--log_interval must be at least 1, got 0"),
        ("- lr\n", r"expected a mapping of option: value, got list"),
        ("lr: [1\n", r"not valid YAML"),
        ("batch_size: 0\n", r"--batch_size must be at least 1, got 0"),
    ],
)
def test_bad_yaml_is_one_line_naming_the_key(tmp_path, text, match):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        parse(TrainConfig, ["--config", cfg_file])
    assert "\n" not in str(err.value)


def test_aliases_and_section_keys(tmp_path):
    assert parse(TrainConfig, ["--freeze_non_embeds_params"]).stage == "align"
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("freeze_non_embeds_params: true\ntp: 2\nplugin: 3d\n")
    cfg = parse(TrainConfig, ["--config", cfg_file])
    assert (cfg.stage, cfg.parallel.tp, cfg.parallel.plugin) == ("align", 2, "3d")
    # comma-separated and space-separated lists both work where the flag has always taken commas
    cfg = parse(PrepareConfig, ["--data_input_dirs", "a,b", "c", "--tokenizer_dir", "t", "--data_output_dirs", "o"])
    assert cfg.data_input_dirs == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="missing required option --tokenizer_dir"):
        parse(PrepareConfig, ["--data_input_dirs", "a", "--data_output_dirs", "o"])


def test_cli_flag_errors_are_one_line_exit_2(tmp_path):
    for args, match in (
        (["--lr", "abc"], "argument --lr: expected float, got 'abc'"),
        (["--plugin", "fsdp"], "argument --plugin: 'fsdp' is not one of"),
        (["--learning_rate", "1"], "unrecognized arguments: --learning_rate"),
    ):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=ROOT, timeout=120
        )
        assert proc.returncode == 2, proc.stderr
        assert match in proc.stderr
        assert "Traceback" not in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_steps: many\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "prune.py"), "--config", bad], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"prune.py: error: {bad}: unknown option 'max_steps'"


def test_user_error_in_a_two_process_run_is_printed_once(model_dir, tmp_path):
    with pytest.raises(AssertionError) as err:
        run_distributed(
            ROOT / "train.py",
            "--pretrained",
            model_dir,
            "--dataset",
            tmp_path / "missing",
            "--plugin",
            "ddp",
            "--mixed_precision",
            "fp32",
        )
    log = str(err.value)
    assert log.count("train.py: error:") == 1, log
    assert "not a prepared dataset" in log
    assert "Failed to load CPU gemm_4bit_forward" not in log


def test_user_errors_share_one_base_class():
    from colossal_shear.core.errors import TrainingError, VocabError
    from colossal_shear.data.prepared import DatasetMismatch
    from colossal_shear.data.records import DataPrepError
    from colossal_shear.pruning.shape import PruneError
    from colossal_shear.train.distributed.plugins import PluginError
    from colossal_shear.train.io.checkpoint import CheckpointError

    for cls in (
        DatasetMismatch,
        DataPrepError,
        PruneError,
        CheckpointError,
        PluginError,
        TrainingError,
        VocabError,
        ConfigError,
    ):
        assert issubclass(cls, UserError), cls
