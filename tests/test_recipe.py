"""The staged recipe end to end (train.example.sh, short): every stage's output loads, the pipeline resumes."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, _free_port
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from colossal_shear.pruning.shape import PruneShape


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
        "MASTER_PORT": str(_free_port()),
        "PYTHON": sys.executable,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    first = subprocess.run(
        ["bash", str(ROOT / "train.example.sh")], env=env, capture_output=True, text=True, timeout=900
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
    assert f"final model: {out}/replay/export" in first.stdout

    again = subprocess.run(
        ["bash", str(ROOT / "train.example.sh")], env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ("align", "prune", "continue", "replay"):
        assert f"stage {stage}: done" in again.stdout
    assert "Training on All Nodes" not in again.stdout
