"""Resuming only what a checkpoint can honour (2 CPU processes, zero2, the real Booster and files): another model,
stage or dataset is one line before any collective load; a new --lr / --max_steps is applied with a notice and a
continuous learning rate; one job per save_dir (a lock naming its holder, stale locks taken over); paths read from
manifests and `latest` stay inside their directory (docs/reliability.md, README "Resuming")."""

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import prepare_bundled_corpus, run_distributed
from test_checkpoint_faults import _fails, _one_error
from test_train import TRAIN, _args, tb_scalars

from colossal_shear.bundled import TinyLlamaShape, build_tiny_llama
from colossal_shear.data.manifest import DatasetMismatch
from colossal_shear.train.io.lock import LOCK, LockHeld, SaveDirLock
from colossal_shear.train.optim import WarmupCosine

ZERO2 = ("--plugin", "zero2")


@pytest.fixture(scope="module")
def base(model_dir, dataset, tmp_path_factory):
    """A zero2 run of 6 steps stopped after step 3 (one checkpoint, step-0000003)."""
    root = tmp_path_factory.mktemp("base")
    run_distributed(TRAIN, *_args(model_dir, dataset, root, *ZERO2, "--stop_at_step", 3))
    assert (root / "ckpt" / "latest").read_text() == "step-0000003"
    return root


def _copy(base, tmp_path) -> Path:
    shutil.copytree(base / "ckpt", tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _resume_args(model_dir, dataset, tmp_path, *extra):
    return [*_args(model_dir, dataset, tmp_path, *ZERO2, *extra), "--load_checkpoint", tmp_path / "ckpt"]


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# --- what a checkpoint was trained from ---------------------------------------------------------------------------


def test_another_pretrained_model_is_refused_in_one_line(base, bundled, dataset, tmp_path):
    """Before: the align stage exported a mix of both models (colossalai dropped the shape mismatches)."""
    other = build_tiny_llama(tmp_path / "other", bundled["tokenizer"], shape=TinyLlamaShape(intermediate_size=128))
    _copy(base, tmp_path)
    started = time.monotonic()
    log = _fails(*_resume_args(other, dataset, tmp_path, "--stage", "align"))
    _one_error(log, f"--pretrained {other}", "intermediate_size 128 != 192 in checkpoint", "step-0000003")
    assert time.monotonic() - started < 120
    assert "size mismatch" not in log  # refused from the manifest, before anything is loaded
    # a checkpoint written before origins were recorded: colossalai's strict load now stops at the first tensor of
    # another shape (compat.strict_shapes), in one line, instead of keeping the new model's values
    manifest_path = tmp_path / "ckpt" / "step-0000003" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["origin"]
    manifest_path.write_text(json.dumps(manifest))
    log = _fails(*_resume_args(other, dataset, tmp_path, "--stage", "align"))
    _one_error(log, "does not fit this run's model, optimizer or stage", "size mismatch for model.layers.0.mlp")


@pytest.mark.parametrize(
    "change,expected",
    [
        (["--stage", "prune", "--target_shape", "64,4,2,96", "--export_dir", "EXPORT"], "--stage prune != continue"),
        (["--stage", "align"], "--stage align != continue"),
        (["--pretrained", "TIED"], "tie_word_embeddings True != False"),
        (["--seed", 7], "--seed 7 != 42"),
    ],
    ids=["prune", "align", "tied", "seed"],
)
def test_another_stage_tied_model_or_seed_is_one_line(
    change, expected, base, model_dir, tied_model_dir, dataset, tmp_path
):
    """Before: `KeyError: 'masks'` (prune), `parameter group doesn't match` (align, a tied model), and a new
    --seed silently ignored (the data order and RNG states come from the checkpoint)."""
    _copy(base, tmp_path)
    change = [tied_model_dir if c == "TIED" else tmp_path / "export" if c == "EXPORT" else c for c in change]
    log = _fails(*_resume_args(model_dir, dataset, tmp_path, *change))
    _one_error(log, expected, "in checkpoint")
    assert "KeyError" not in log and "doesn't match" not in log


def test_a_dataset_reprepared_with_another_seed_is_refused(base, model_dir, tokenizer_dir, tmp_path):
    """Before: accepted (only the part sizes were compared) and trained on other sequences."""
    other = tmp_path / "reprepared"
    prepare_bundled_corpus(tokenizer_dir, other, seed=7)
    _copy(base, tmp_path)
    log = _fails(*_resume_args(model_dir, other, tmp_path))
    _one_error(log, "--dataset: prepared with seed [7] != [42] in checkpoint", "another order")


@pytest.fixture(scope="module")
def changed(base, model_dir, dataset, tmp_path_factory):
    """A resume with --lr 1e-3 (was 3e-3) and --max_steps 8 (was 6), into a save_dir that holds a stale lock (its pid
    is gone) and a stale temporary directory of that job."""
    tmp = tmp_path_factory.mktemp("changed")
    ckpt = _copy(base, tmp)
    stale = {"host": socket.gethostname(), "pid": _dead_pid(), "started": "2026-01-01T00:00:00", "job": "old-job"}
    (ckpt / LOCK).write_text(json.dumps(stale))
    (ckpt / ".tmp-step-0000004-old-job").mkdir()
    args = _resume_args(model_dir, dataset, tmp)
    args[args.index("--lr") + 1], args[args.index("--max_steps") + 1] = 1e-3, 8
    return tmp, run_distributed(TRAIN, *args)


def test_a_new_lr_and_max_steps_apply_with_a_notice_and_a_continuous_schedule(base, changed):
    tmp, proc = changed
    notes = [line for line in proc.stdout.splitlines() if "applied from step 3" in line]
    assert len(notes) == 1, proc.stdout
    assert "--lr 0.003 -> 0.001" in notes[0] and "--max_steps 6 -> 8" in notes[0], notes[0]
    lr = tb_scalars(tmp / "tb", "train/lr")
    assert sorted(lr) == [4, 5, 6, 7, 8]
    at_resume = 3e-3 * WarmupCosine(2, 6)(3)  # what the uninterrupted run used at step 4
    assert lr[4] < at_resume  # it goes on down from there: no jump back up (before: 1.0e-4 -> 2.3e-4)
    assert all(lr[s + 1] < lr[s] for s in range(4, 8))
    assert lr[8] == pytest.approx(0.1 * 1e-3, rel=1e-5)  # the new end: 10% of the new peak at the new last step
    config = (tmp / "ckpt" / "config.yaml").read_text()
    assert "lr: 0.001" in config and "max_steps: 8" in config
    history = tmp / "ckpt" / "config-history" / "until-step-0000003.yaml"
    assert "lr: 0.003" in history.read_text()  # what the run used before, kept


def test_a_stale_lock_is_taken_over_with_a_notice_and_released_at_exit(changed):
    tmp, proc = changed
    notes = [line for line in proc.stdout.splitlines() if "took over the stale lock" in line]
    assert len(notes) == 1 and "job old-job" in notes[0] and "is no longer running" in notes[0], proc.stdout
    names = sorted(p.name for p in (tmp / "ckpt").iterdir())
    assert LOCK not in names and not [n for n in names if n.startswith(".")], names  # released, no leftovers
    assert (tmp / "ckpt" / "latest").read_text() == "step-0000008"


# --- one job per save_dir --------------------------------------------------------------------------------------------


def test_a_second_job_on_a_save_dir_is_refused_before_its_first_step(base, model_dir, dataset, tmp_path):
    """The holder is alive (this test's process): the second job stops before training, naming it."""
    ckpt = _copy(base, tmp_path)
    holder = SaveDirLock(ckpt, "first-job")
    holder.acquire()
    try:
        log = _fails(*_resume_args(model_dir, dataset, tmp_path))
        _one_error(log, f"--save_dir {ckpt} is in use by job first-job", f"pid {os.getpid()} on {socket.gethostname()}")
        assert not (tmp_path / "tb").exists()  # stopped before the run's logger (and its first step)
        assert json.loads((ckpt / LOCK).read_text())["job"] == "first-job"
    finally:
        holder.release()
    assert not (ckpt / LOCK).exists()


def test_a_lock_from_another_host_is_stale_only_when_its_heartbeat_is_old(tmp_path, monkeypatch):
    """Another host's pid cannot be asked: its heartbeat (the lock's modification time) decides."""
    other = {"host": "other-host", "pid": 1, "started": "2026-01-01T00:00:00", "job": "remote"}
    (tmp_path / LOCK).write_text(json.dumps(other))
    with pytest.raises(LockHeld, match="in use by job remote .pid 1 on other-host"):
        SaveDirLock(tmp_path, "mine").acquire()
    monkeypatch.setenv("COLOSSAL_SHEAR_LOCK_STALE_S", "60")
    old = time.time() - 120
    os.utime(tmp_path / LOCK, (old, old))
    lock = SaveDirLock(tmp_path, "mine")
    notice = lock.acquire()
    assert "took over the stale lock of job remote" in notice and "heartbeat is 120 s old" in notice
    assert json.loads((tmp_path / LOCK).read_text())["job"] == "mine"
    lock.release()
    assert not (tmp_path / LOCK).exists()


def test_a_takeover_gives_back_a_lock_taken_meanwhile(tmp_path):
    """Two jobs judging the same stale lock: the one that renames a fresh lock (taken by the other) puts it back."""
    (tmp_path / LOCK).write_text(json.dumps({"host": "h", "pid": 1, "job": "fresh"}))
    lock = SaveDirLock(tmp_path, "late")
    assert not lock._take_over({"host": "h", "pid": 1, "job": "stale"})
    assert json.loads((tmp_path / LOCK).read_text())["job"] == "fresh"
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK]


# --- paths read from files stay inside their directory ----------------------------------------------------------------


def _entry(ckpt: Path, new_name: str) -> None:
    """Rename a manifest entry (keeping its size and sha256, as a tamperer would) to `new_name`."""
    manifest_path = ckpt / "step-0000003" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][new_name] = manifest["files"].pop("rank-1.pt")
    manifest_path.write_text(json.dumps(manifest))


def test_a_manifest_entry_going_up_is_refused(base, model_dir, dataset, tmp_path):
    ckpt = _copy(base, tmp_path)
    shutil.copy(ckpt / "step-0000003" / "rank-1.pt", tmp_path / "rank-1.pt")  # a matching file outside
    _entry(ckpt, "../../rank-1.pt")
    args = _args(model_dir, dataset, tmp_path, *ZERO2)
    log = _fails(*args, "--load_checkpoint", ckpt / "step-0000003")
    _one_error(log, "the entry '../../rank-1.pt' goes up ('..'): refused like a corrupted manifest")


def test_an_absolute_entry_and_a_latest_symlink_out_are_refused(base, model_dir, dataset, tmp_path):
    """Before: an absolute entry was a KeyError crash; a `latest` symlink printed the file it pointed to."""
    ckpt = _copy(base, tmp_path)
    _entry(ckpt, str(tmp_path / "rank-1.pt"))
    secret = tmp_path / "secret.txt"
    secret.write_text("TOKEN-123")
    (ckpt / "latest").unlink()
    (ckpt / "latest").symlink_to(secret)
    log = _fails(*_resume_args(model_dir, dataset, tmp_path))
    line = _one_error(log, "latest is a symlink", "is an absolute path: refused like a corrupted manifest")
    assert "TOKEN-123" not in log and "KeyError" not in log, line


def test_a_dataset_manifest_part_going_up_is_refused(dataset, tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from colossal_shear.data.prepared import open_prepared

    copy = tmp_path / "data"
    shutil.copytree(dataset, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["parts"][0]["name"] = "../../x"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetMismatch, match=r"part name '../../x' goes up .*refused like a corrupted manifest"):
        open_prepared([str(copy)], AutoTokenizer.from_pretrained(tokenizer_dir))
    manifest["parts"][0]["name"] = "/etc"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetMismatch, match="is an absolute path"):
        open_prepared([str(copy)], AutoTokenizer.from_pretrained(tokenizer_dir))


def test_a_new_lm_weight_or_teacher_is_refused_on_resume():
    """The distillation mix is fixed for a run (origin.FIXED): a resume that changes it names the flag in one line."""
    from colossal_shear.train.io.origin import FIXED, mismatch

    assert {"distill.kd_weight", "distill.lm_weight"} <= set(FIXED)
    same = {"model": {"config": {}, "weights": "w", "path": "m"}, "tokenizer": "t", "dataset": {"hash": "d"}}
    saved = {**same, "settings": {"distill.lm_weight": 1.0, "distill.teacher": "parent"}}
    for change, expected in (
        ({"distill.lm_weight": 0.0}, "--lm_weight 0.0 != 1.0"),
        ({"distill.teacher": None}, "--teacher None != parent"),
    ):
        line = mismatch(saved, {**same, "settings": {**saved["settings"], **change}}, "ckpt/step-3")
        assert line.startswith(expected) and "in checkpoint ckpt/step-3" in line, line
