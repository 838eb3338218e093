"""The staged recipe end to end (train.example.sh, short): every stage's output loads, the pipeline resumes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, _free_port
from test_train import tb_scalars
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from colossal_shear.core.config import load_yaml
from colossal_shear.core.fetch import AssetUnavailable
from colossal_shear.pruning.shape import PruneShape
from colossal_shear.train.config import TrainConfig

EVALUATED = ("base", "align", "prune", "continue", "replay")


def benchmark_tasks() -> str:
    """piqa when the benchmark data is cached or can be fetched, else none (the text metrics still run)."""
    from colossal_shear.eval.benchmarks import data_root

    try:
        data_root()
        return "piqa"
    except AssetUnavailable:
        return ""


def recipe(env: dict, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "train.example.sh")], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def l0_run(tmp_path_factory):
    """The whole recipe once, pruning with learned masks distilled from the parent: (output dir, env, process)."""
    out = tmp_path_factory.mktemp("recipe") / "run"
    env = {
        **os.environ,
        "PARENT_SAVE_DIR": str(out),
        "ALIGN_STEPS": "2",
        "PRUNE_METHOD": "l0",
        "PRUNE_STEPS": "4",
        "PRUNE_KD": "1",
        "CONTINUE_STEPS": "2",
        "REPLAY_STEPS": "2",
        "NUM_NEW_PIECES": "16",
        "EVAL_TASKS": benchmark_tasks(),
        "EVAL_LIMIT": "4",
        "MASTER_PORT": str(_free_port()),
        "PYTHON": sys.executable,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    first = recipe(env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return out, env, first


def test_recipe_runs_every_stage_and_skips_finished_ones(l0_run):
    out, env, first = l0_run

    base = AutoTokenizer.from_pretrained(out / "base" / "tiny-llama")
    adapted = AutoTokenizer.from_pretrained(out / "vocab" / "model")
    assert len(adapted) > len(base)
    for stage in ("align", "prune", "continue", "replay"):
        export = out / stage / "export"
        AutoModelForCausalLM.from_pretrained(export)
        assert len(AutoTokenizer.from_pretrained(export)) == len(adapted), stage
    pruned = PruneShape.from_config(AutoConfig.from_pretrained(out / "prune" / "export"))
    assert (pruned.hidden, pruned.heads, pruned.layers, pruned.intermediate) == (48, 2, 3, 128)
    assert tb_scalars(out / "tensorboard" / "prune", "train/kd_loss"), "PRUNE_KD=1: distilled from the parent"
    assert PruneShape.from_config(AutoConfig.from_pretrained(out / "replay" / "export")) == pruned
    report = (out / "report.md").read_text()
    for row in (
        "tokens per character (before vocab change)",
        "parameters (after pruning)",
        "loss (prune)",
        "loss (replay)",
    ):
        assert row in report
    assert (out / "expected_sparsity.png").is_file() and (out / "domain_weights.png").is_file()
    for name in EVALUATED:  # the base model and every stage's export, evaluated
        results = json.loads((out / "eval" / f"{name}.json").read_text())
        assert results["text"]["zh"]["nats_per_char"] > 0, name
        if env["EVAL_TASKS"]:
            assert results["tasks"]["piqa"]["n"] == 4, name
        assert f"| {name} | " in report.split("## Evaluation per stage")[1]
    assert (out / "nats_per_char_per_stage.png").is_file()
    assert f"final model: {out}/replay/export" in first.stdout

    again = recipe(env, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ("align", "prune", "continue", "replay"):
        assert f"stage {stage}: done" in again.stdout
    for name in EVALUATED:
        assert f"eval {name}: done" in again.stdout
    assert "Training on All Nodes" not in again.stdout


@pytest.mark.parametrize("method,steps", [("importance", 16), ("depth", 4)])
def test_recipe_prunes_one_shot_then_recovers_distilled_by_the_budget_rule(method, steps, l0_run, tmp_path):
    """PRUNE_METHOD=importance|depth from the l0 run's aligned model (its earlier steps copied, so skipped), up to
    the prune stage (STOP_AFTER=prune): prune.py, then recovery into prune/export, distilled from the aligned model
    when PRUNE_KD=auto finds the budget large enough (16 steps x 4 sequences x 2 processes x 128 tokens = 16,384
    tokens: on; 4 steps: 4,096 tokens, off)."""
    src, env, _ = l0_run
    out = tmp_path / "run"
    for part in ("base", "vocab", "data", "align"):
        shutil.copytree(src / part, out / part, symlinks=True)
    env = {**env, "PARENT_SAVE_DIR": str(out), "PRUNE_METHOD": method, "STOP_AFTER": "prune"}
    env.update(CALIBRATION_SAMPLES="16", MASTER_PORT=str(_free_port()), PRUNE_KD="auto", PRUNE_STEPS=str(steps))
    proc = recipe(env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stage align: done" in proc.stdout and "STOP_AFTER=prune" in proc.stdout
    tokens, on = steps * 4 * 2 * 128, steps == 16
    rule = f"PRUNE_KD=auto: the prune stage trains on {tokens} tokens, distillation {'on' if on else 'off'}"
    assert rule in proc.stdout
    assert not (out / "continue").exists()
    source = PruneShape.from_config(AutoConfig.from_pretrained(out / "align" / "export"))
    pruned = PruneShape.from_config(AutoConfig.from_pretrained(out / "prune" / "export"))
    if method == "importance":
        assert (pruned.hidden, pruned.heads, pruned.layers, pruned.intermediate) == (48, 2, 3, 128)
    else:  # whole layers only: the source's width, fewer layers
        assert (pruned.hidden, pruned.heads, pruned.intermediate) == (source.hidden, source.heads, source.intermediate)
        assert pruned.layers < source.layers
    AutoModelForCausalLM.from_pretrained(out / "prune" / "export")
    logged = tb_scalars(out / "tensorboard" / "prune")  # recovery's LM loss, at every logged step
    assert max(logged) == steps
    if on:  # distilled from the aligned model at every logged step, KL only
        assert tb_scalars(out / "tensorboard" / "prune", "train/kd_loss").keys() == logged.keys()
        used = load_yaml(out / "prune" / "checkpoints" / "config.yaml", TrainConfig)
        assert (used["teacher"], used["lm_weight"]) == (str(out / "align" / "export"), 0.0)
    else:
        with pytest.raises(KeyError):
            tb_scalars(out / "tensorboard" / "prune", "train/kd_loss")


@pytest.mark.parametrize(
    "var,value,error",
    [
        ("PRUNE_METHOD", "magic", "error: PRUNE_METHOD=magic: must be l0, importance or depth"),
        ("PRUNE_KD", "yes", "error: PRUNE_KD=yes: must be 0, 1 or auto"),
        ("HOSTFILE", "EMPTY", "error: HOSTFILE=EMPTY: no host names in it"),
    ],
)
def test_recipe_refuses_a_bad_setting_before_any_work(var, value, error, tmp_path):
    if value == "EMPTY":
        value = str(tmp_path / "hostfile")
        Path(value).write_text("# no hosts yet\n\n")
        error = error.replace("EMPTY", value)
    env = {**os.environ, "PARENT_SAVE_DIR": str(tmp_path / "run"), var: value}
    proc = recipe(env, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == error
    assert not (tmp_path / "run").exists(), "work was done before the refusal"
