"""Faults during training (docs/reliability.md): an error on one rank ends the whole job promptly with its message
printed once; non-finite steps are skipped on every rank together and never reach a checkpoint; and the
accumulation loop does not synchronise with the host."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import ROOT, _free_port, run_distributed
from safetensors.torch import load_file
from test_train import _args, tb_scalars

TRAIN = ROOT / "train.py"
FAULTY = ROOT / "tests" / "workers" / "faulty_train.py"


def launch(script, *args, launcher="torchrun", env=None, timeout=240):
    """Like run_distributed, but returns the failed process (and when it ended) instead of raising."""
    bindir = Path(sys.executable).parent
    if launcher == "torchrun":
        cmd = [str(bindir / "torchrun"), "--standalone", "--nproc_per_node=2", str(script), *map(str, args)]
    else:
        cmd = [
            str(bindir / "colossalai"),
            "run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            str(script),
            *map(str, args),
        ]
    full_env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "PATH": f"{bindir}:{os.environ['PATH']}",
        **(env or {}),
    }
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # a hung job: stop the launcher and every worker it started
        launcher_proc = psutil.Process(proc.pid)
        for p in [*launcher_proc.children(recursive=True), launcher_proc]:
            p.kill()
        out, err = proc.communicate()
        raise AssertionError(f"still running after {timeout} s:\n{out[-3000:]}\n{err[-5000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), time.time()


def records(log: Path) -> list[dict]:
    return [json.loads(Path(f"{log}.rank-{r}.json").read_text()) for r in range(2)]


# --- errors are collective -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("launcher", ["torchrun", "colossalai"])
def test_an_error_on_one_rank_ends_the_job_within_a_minute(launcher, model_dir, dataset, tmp_path):
    """Rank 1 raises mid-training while rank 0 goes on into the step's collectives: the job ends non-zero within
    60 s (not at the 30-minute process-group timeout) and rank 1's message is printed once."""
    log = tmp_path / "fault"
    proc, ended = launch(
        FAULTY,
        *_args(model_dir, dataset, tmp_path, "--plugin", "zero2", steps=6),
        launcher=launcher,
        env={"FAULT": "raise:1:2", "FAULT_LOG": str(log)},
    )
    raised_at = json.loads(Path(f"{log}.rank-1.json").read_text())["raised_at"]
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert ended - raised_at < 60, output
    assert output.count("RuntimeError: injected fault on rank 1 at step 2") == 1, output


def test_a_missing_rank_file_on_resume_ends_the_job_within_a_minute(model_dir, dataset, tmp_path):
    args = _args(model_dir, dataset, tmp_path, "--plugin", "ddp", steps=4)
    run_distributed(TRAIN, *args, "--stop_at_step", 2, "--save_interval", 2)
    missing = tmp_path / "ckpt" / "step-0000002" / "rank-1.pt"
    missing.unlink()
    started = time.time()
    proc, ended = launch(TRAIN, *args, "--load_checkpoint", tmp_path / "ckpt")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert ended - started < 180, output  # start-up included (slow on a loaded machine): the hang lasted 30 minutes
    assert output.count(f"{missing} is missing") == 1, output


# --- non-finite steps ------------------------------------------------------------------------------------------------


PLUGIN_CASES = {
    "ddp": ["--plugin", "ddp"],
    "zero2": ["--plugin", "zero2"],
    "zero2_cpu": ["--plugin", "zero2_cpu"],
    "3d_tp2": ["--plugin", "3d", "--tp", 2],
    "3d_pp2": ["--plugin", "3d", "--pp", 2, "--microbatch_size", 1],
}


@pytest.mark.parametrize("plugin", list(PLUGIN_CASES))
def test_inf_gradients_on_one_rank_skip_the_step_on_every_rank(plugin, model_dir, dataset, tmp_path):
    """A finite loss with an inf gradient on rank 1 only: both ranks skip that step, the run goes on and ends with
    finite weights."""
    flags = PLUGIN_CASES
    log = tmp_path / "fault"
    run_distributed(
        FAULTY,
        *_args(model_dir, dataset, tmp_path, *flags[plugin], "--grad_clip", 0, steps=4),
        env={"FAULT": "infgrad:1:1", "FAULT_LOG": str(log)},
    )
    for rank, record in enumerate(records(log)):
        assert record["applied"] == {"0": True, "1": False, "2": True, "3": True}, (rank, record["applied"])
    assert tb_scalars(tmp_path / "tb", "train/skipped_steps") == {1: 0, 2: 1, 3: 1, 4: 1}
    losses = tb_scalars(tmp_path / "tb")
    assert all(torch.isfinite(torch.tensor(list(losses.values())))), losses
    model = tmp_path / "ckpt" / "step-0000004" / "model"
    for f in model.glob("*.safetensors"):
        for name, tensor in load_file(f).items():
            assert torch.isfinite(tensor).all(), (f, name)


def assert_finite_checkpoints(save_dir: Path) -> list[Path]:
    kept = sorted(save_dir.glob("step-*"))
    for ckpt in kept:
        for f in (ckpt / "model").glob("*.safetensors"):
            for name, tensor in load_file(f).items():
                assert torch.isfinite(tensor).all(), (f, name)
    return kept


@pytest.mark.parametrize("plugin", ["ddp", "zero2"])
def test_a_diverging_run_keeps_only_finite_checkpoints_and_names_the_newest(plugin, model_dir, dataset, tmp_path):
    """Gradients turn inf from step 3 on (the loss stays finite): those steps are skipped, no checkpoint is written
    during the streak, rotation keeps the newest good one, and the run gives up naming it."""
    log = tmp_path / "fault"
    args = _args(
        model_dir,
        dataset,
        tmp_path,
        "--plugin",
        plugin,
        "--save_interval",
        1,
        "--keep_last",
        2,
        "--max_bad_steps",
        3,
        "--grad_clip",
        0,
        steps=12,
    )
    proc, _ = launch(FAULTY, *args, env={"FAULT": "infgrads:1:3", "FAULT_LOG": str(log)})
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    kept = assert_finite_checkpoints(tmp_path / "ckpt")
    assert [p.name for p in kept] == ["step-0000002", "step-0000003"], output
    message = (
        "3 consecutive steps had a NaN/inf loss or gradient norm at step 6: lower --lr, use bf16 or fp32, or "
        f"check the data; the newest checkpoint with finite weights is {kept[-1]}"
    )
    assert output.count(message) == 1, output


def test_an_overflowing_learning_rate_writes_no_checkpoint(model_dir, dataset, tmp_path):
    """--lr 1e30: the first update overflows the weights while its loss and gradients were finite, so the first
    checkpoint would hold inf/NaN; none is written and the run stops saying so."""
    proc, _ = launch(TRAIN, *_args(model_dir, dataset, tmp_path, "--lr", "1e30", "--save_interval", 1, steps=6))
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert assert_finite_checkpoints(tmp_path / "ckpt") == [], output
    assert (
        output.count(
            "the weights are no longer finite at step 1: lower --lr, use bf16 or fp32, or check the "
            "data; no checkpoint with finite weights was written by this run"
        )
        == 1
    ), output


def test_a_run_whose_last_step_is_not_finite_does_not_succeed(model_dir, dataset, tmp_path):
    log = tmp_path / "fault"
    proc, _ = launch(
        FAULTY,
        *_args(model_dir, dataset, tmp_path, "--plugin", "ddp", "--export_dir", tmp_path / "export", steps=4),
        env={"FAULT": "infgrad:0:3", "FAULT_LOG": str(log)},
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert output.count("the last 1 step(s) had a NaN/inf loss or gradient norm at step 4") == 1, output
    assert "step-0000003" in output
    assert not (tmp_path / "export").exists()
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step-*")) == ["step-0000003"]


# --- host synchronisation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("plugin", ["ddp", "zero2", "3d_pp2"])
def test_one_host_synchronisation_per_optimizer_step(plugin, model_dir, dataset, tmp_path):
    """With 3 micro-batches per step: nothing reads a value back or all-reduces inside the accumulation loop, and
    the step's decision is one all-reduce and one host read of the trainer's."""
    flags = PLUGIN_CASES
    log = tmp_path / "fault"
    run_distributed(
        FAULTY,
        *_args(model_dir, dataset, tmp_path, *flags[plugin], "--accumulation_steps", 3, "--save_interval", 0, steps=3),
        env={"FAULT": "count", "FAULT_LOG": str(log)},
    )
    for rank, record in enumerate(records(log)):
        counts = record["counts"]
        for step in range(3):
            # colossalai's pipeline exchanges its tensor shapes once, in the first step
            inside = {
                k: v
                for k, v in counts.items()
                if k.startswith(f"{step}/micro/")
                and (step > 0 or not k.endswith("p2p.py:_send_recv_serialization_object"))
            }
            assert inside == {}, (rank, inside)
            ours = {
                k.split("/", 2)[2]: v
                for k, v in counts.items()
                if k.startswith(f"{step}/decision/") and k.endswith(":_decide")
            }
            assert ours == {"all_reduce/trainer.py:_decide": 1, "host_read/trainer.py:_decide": 1}, (rank, ours)
            others = {
                k: v
                for k, v in counts.items()
                if k.startswith(f"{step}/decision/")
                and any(name in k for name in ("trainer.py", "engine.py", "collective.py"))
                and not k.endswith(":_decide")
            }
            assert others == {}, (rank, others)


def test_agree_raises_on_every_rank_and_prints_once():
    proc, _ = launch(ROOT / "tests" / "workers" / "agree_probe.py")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert output.count("agree_probe.py: error: [rank 1] rank-1.pt is missing") == 1, output
    assert output.count("raised CollectiveError") == 2, output
