"""Preemption (docs/reliability.md): a signal to the launcher or to one rank makes every rank stop at the same step
boundary, save, and exit 75; the saved run resumes exactly. A launcher that is gone (SIGKILL to torchrun, SIGTERM to
`colossalai run`) leaves no worker training."""

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, _free_port, run_distributed
from test_train import _args, tb_scalars

TRAIN = ROOT / "train.py"
REFERENCE_STEPS = 16  # the uninterrupted run every stopped-and-resumed run here is compared with
STOPPED = re.compile(r"train\.py: stopped at step (\d+) \((.*)\): saved (\S+); the same command")


def _job_args(model_dir, dataset, out, *extra):
    """1000 scheduled steps, checkpoints only on request (--save_interval beyond the run)."""
    return _args(model_dir, dataset, out, "--plugin", "zero2", "--save_interval", 100000, *extra, steps=1000)


class Job:
    """A launcher started in its own session, its merged output collected while it runs."""

    def __init__(self, args, launcher="torchrun", env=None):
        bindir = Path(sys.executable).parent
        if launcher == "torchrun":
            cmd = [bindir / "torchrun", "--standalone", "--nproc_per_node=2", TRAIN, *args]
        else:
            cmd = [bindir / "colossalai", "run", "--nproc_per_node", 2, "--master_port", _free_port(), TRAIN, *args]
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "PATH": f"{bindir}:{os.environ['PATH']}",
            **(env or {}),
        }
        self.proc = subprocess.Popen(
            [str(c) for c in cmd],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.output, self.seen = b"", {}

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    def until(self, done, guard: float = 300.0) -> bool:
        """Collect output until `done()` holds or the output ends (`guard` only keeps a broken run from hanging)."""
        deadline = time.monotonic() + guard
        while not done() and time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            chunk = self.proc.stdout.read() if ready else None
            if chunk == b"":
                break
            self.output += chunk or b""
        return bool(done())

    def at_step(self, step: int) -> bool:
        return self.until(lambda: re.search(rf"^step {step} \|", self.text, re.M))

    def workers(self) -> list[psutil.Process]:
        """The training processes (torchrun gives only them a LOCAL_RANK)."""
        found = [p for p in psutil.Process(self.proc.pid).children(recursive=True) if "LOCAL_RANK" in p.environ()]
        self.seen.update((p.pid, p) for p in found)
        return found

    def finish(self) -> int:
        self.until(lambda: False)
        return self.proc.wait(timeout=60)

    def stop(self) -> None:
        """Kill whatever the launcher left in its session, and the workers seen (torchrun starts each in a session
        of its own): the test's own clean-up."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in self.seen.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        self.proc.wait()
        self.proc.stdout.close()


def running(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (an exited worker whose launcher is gone may stay a zombie of whoever adopted it)."""
    out = []
    for p in processes:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.fixture(scope="module")
def reference(model_dir, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("preemption-reference")
    run_distributed(TRAIN, *_job_args(model_dir, dataset, out, "--stop_at_step", REFERENCE_STEPS))
    return tb_scalars(out / "tb")


def assert_resumes_exactly(model_dir, dataset, tmp_path, step, reference):
    """The stopped run's checkpoint resumed for 2 more steps logs the uninterrupted run's losses."""
    assert step + 2 <= REFERENCE_STEPS, f"stopped too late (step {step}) for the reference run"
    resumed = tmp_path / "resumed-tb"
    run_distributed(
        TRAIN,
        *_job_args(model_dir, dataset, tmp_path, "--tensorboard_dir", resumed, "--stop_at_step", step + 2),
        "--load_checkpoint",
        tmp_path / "ckpt",
    )
    got = tb_scalars(resumed)
    assert sorted(got) == [step + 1, step + 2], got
    for s in got:
        assert got[s] == pytest.approx(reference[s], abs=1e-6, rel=0), f"step {s}: {got} vs {reference}"


def assert_stopped_once(text: str, save_dir: Path, *why: str) -> int:
    """One line from rank 0 naming the step, the reason and the checkpoint, which `latest` names; no worker
    traceback (a KeyboardInterrupt on SIGINT was one per rank, 185 lines in all)."""
    found = STOPPED.findall(text)
    assert len(found) == 1, text[-6000:]
    step, reason, saved = int(found[0][0]), found[0][1], found[0][2]
    assert reason in why, text[-6000:]
    assert saved == str(save_dir / f"step-{step:07d}"), text[-6000:]
    assert (save_dir / "latest").read_text().strip() == f"step-{step:07d}"
    assert "KeyboardInterrupt" not in text and "[rank0]: Traceback" not in text and "[rank1]: Traceback" not in text
    return step


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_to_the_launcher_saves_and_the_run_resumes_exactly(sig, model_dir, dataset, reference, tmp_path):
    """torchrun forwards SIGTERM / SIGINT to its workers (and SIGKILLs them 30 s later): both ranks stop at the same
    step, save it, and exit 75; resuming that checkpoint follows the uninterrupted run. (torchrun then exits 1 with
    its own SignalException traceback, whatever its workers did.)"""
    job = Job(_job_args(model_dir, dataset, tmp_path))
    try:
        assert job.at_step(2), job.text[-5000:]
        os.kill(job.proc.pid, getattr(signal, sig))
        rc = job.finish()
    finally:
        job.stop()
    assert rc == 1, job.text[-5000:]
    step = assert_stopped_once(job.text, tmp_path / "ckpt", sig)
    assert job.text.count("Traceback") == 1 and f"SignalException: Process {job.proc.pid} got signal" in job.text
    if sig == "SIGTERM":  # the same stop and save either way: one resume suffices
        assert_resumes_exactly(model_dir, dataset, tmp_path, step, reference)


def test_sigusr1_to_one_rank_stops_every_rank_at_the_same_step(model_dir, dataset, tmp_path):
    """Slurm's `--signal=USR1` reaching rank 1 only: rank 0 learns it in the step's decision; both save one
    checkpoint and exit 75, which torchrun reports for the first of them."""
    job = Job(_job_args(model_dir, dataset, tmp_path))
    try:
        assert job.at_step(2), job.text[-5000:]
        rank1 = next(p for p in job.workers() if p.environ().get("RANK") == "1")
        rank1.send_signal(signal.SIGUSR1)
        rc = job.finish()
    finally:
        job.stop()
    assert rc == 1, job.text[-5000:]
    assert_stopped_once(job.text, tmp_path / "ckpt", "another rank was asked to stop")
    assert "failed (exitcode: 75)" in job.text, job.text[-5000:]
    assert len(list((tmp_path / "ckpt").glob("step-*"))) == 1


@pytest.mark.parametrize(("launcher", "sig"), [("torchrun", "SIGKILL"), ("colossalai", "SIGTERM")])
def test_no_worker_outlives_its_launcher(launcher, sig, model_dir, dataset, tmp_path):
    """The launcher killed (SIGKILL to torchrun; SIGTERM to `colossalai run`, which leaves its torchrun running):
    each worker sees its launcher gone, the ranks agree to stop at a step boundary and save, and no worker is left
    30 s later."""
    job = Job(_job_args(model_dir, dataset, tmp_path), launcher=launcher)
    try:
        assert job.at_step(2), job.text[-5000:]
        workers = job.workers()
        os.kill(job.proc.pid, getattr(signal, sig))
        job.until(lambda: not running(workers), guard=30)
        alive = running(workers)
    finally:
        job.stop()
    assert len(workers) == 2 and not alive, job.text[-5000:]
    # the rank that prints may have learnt it from the other one, in the step's decision
    gone = f"the launcher (pid {job.proc.pid}) is gone"
    assert_stopped_once(job.text, tmp_path / "ckpt", gone, "another rank was asked to stop")


def test_a_worker_that_cannot_agree_with_its_peers_ends_itself(model_dir, dataset, tmp_path):
    """torchrun killed while rank 1 is frozen (SIGSTOP): rank 0, blocked in the step's all-reduce, cannot agree with
    it, and its watcher ends it COLOSSAL_SHEAR_STOP_GRACE seconds after it noticed, without a save."""
    job = Job(_job_args(model_dir, dataset, tmp_path), env={"COLOSSAL_SHEAR_STOP_GRACE": "3"})
    try:
        assert job.at_step(2), job.text[-5000:]
        ranks = {p.environ()["RANK"]: p for p in job.workers()}
        ranks["1"].suspend()
        os.kill(job.proc.pid, signal.SIGKILL)
        job.until(lambda: not running([ranks["0"]]), guard=60)
        left = running([ranks["0"]])
    finally:
        job.stop()
    assert not left, job.text[-5000:]
    assert job.text.count("[rank 0] still running 3 s after the launcher went") == 1, job.text[-5000:]
    assert not (tmp_path / "ckpt" / "latest").exists()


def _readme_function(name: str) -> str:
    """A shell function as the README shows it (so the documented workaround is the tested one)."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"{name}() {{")
    indent = text.rindex("\n", 0, start) + 1
    lines = text[indent : text.index("\n   }\n", start) + 5].splitlines()
    return "\n".join(line[start - indent :] for line in lines) + "\n"


def test_a_failed_colossalai_run_prints_secrets_unless_launched_without_them(tmp_path):
    """colossalai's behaviour (it cannot be patched from the workers): a failed host command is printed with the
    launching shell's environment, values included. The README's `colossalai_run` leaves such variables out."""
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "MY_API_TOKEN": "tok-8c1f", "DB_PASSWORD": "pw-77a2"}
    launch = f"--nproc_per_node 1 --master_port {_free_port()} {tmp_path / 'missing.py'}"
    for how, secrets_shown in (("colossalai run", True), ("colossalai_run", False)):
        script = _readme_function("colossalai_run") + f"{how} {launch}\n"
        proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        output = proc.stdout + proc.stderr
        assert proc.returncode != 0 and "Command: 'cd " in output, output[-3000:]
        assert ("tok-8c1f" in output and "pw-77a2" in output) == secrets_shown, output[-3000:]
        assert f'PATH="{env["PATH"]}"' in output  # the rest of the environment still goes to every host


@pytest.mark.parametrize(("session", "watched"), [("sshd: root@notty", 2), ("sshd: root@pts/0", 1)])
def test_a_worker_watches_a_non_interactive_ssh_session_not_a_login(session, watched):
    """A worker (LOCAL_RANK set) under a stand-in for torchrun under an sshd session: the session of a command
    (how `colossalai run` reaches other hosts) is watched with its launcher; an interactive login is not, so
    `nohup torchrun … &` outlives it."""
    code = "from colossal_shear.train.distributed import preemption; print(len(preemption.launcher_chain()))"
    probe = f"{sys.executable} -c '{code}'"
    script = 'exec -a "$0" bash -c \'bash -c "$PROBE; true"; true\''
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LOCAL_RANK": "0", "PROBE": probe}
    proc = subprocess.run(["bash", "-c", script, session], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == [str(watched)], proc.stdout + proc.stderr
