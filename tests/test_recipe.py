"""The staged recipe end to end (train.example.sh, short): every stage's output loads, the pipeline resumes."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, _free_port
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from colossal_shear.core.fetch import AssetUnavailable
from colossal_shear.pruning.shape import PruneShape

EVALUATED = ("base", "align", "prune", "continue", "replay")


def benchmark_tasks() -> str:
    """piqa when the benchmark data is cached or can be fetched, else none (the text metrics still run)."""
    from colossal_shear.eval.benchmarks import data_root

    try:
        data_root()
        return "piqa"
    except AssetUnavailable:
        return ""


def test_recipe_runs_every_stage_and_skips_finished_ones(tmp_path):
    out = tmp_path / "run"
    env = {
        **os.environ,
        "PARENT_SAVE_DIR": str(out),
        "ALIGN_STEPS": "2",
        "PRUNE_STEPS": "4",
        "CONTINUE_STEPS": "2",
        "REPLAY_STEPS": "2",
        "NUM_NEW_PIECES": "16",
        "EVAL_TASKS": benchmark_tasks(),
        "EVAL_LIMIT": "4",
        "MASTER_PORT": str(_free_port()),
        "PYTHON": sys.executable,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    first = subprocess.run(
        ["bash", str(ROOT / "train.example.sh")], env=env, capture_output=True, text=True, timeout=1200
    )
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    base = AutoTokenizer.from_pretrained(out / "base" / "tiny-llama")
    adapted = AutoTokenizer.from_pretrained(out / "vocab" / "model")
    assert len(adapted) > len(base)
    for stage in ("align", "prune", "continue", "replay"):
        export = out / stage / "export"
        AutoModelForCausalLM.from_pretrained(export)
        assert len(AutoTokenizer.from_pretrained(export)) == len(adapted), stage
    pruned = PruneShape.from_config(AutoConfig.from_pretrained(out / "prune" / "export"))
    assert (pruned.hidden, pruned.heads, pruned.layers, pruned.intermediate) == (48, 2, 3, 128)
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

    again = subprocess.run(
        ["bash", str(ROOT / "train.example.sh")], env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ("align", "prune", "continue", "replay"):
        assert f"stage {stage}: done" in again.stdout
    for name in EVALUATED:
        assert f"eval {name}: done" in again.stdout
    assert "Training on All Nodes" not in again.stdout
