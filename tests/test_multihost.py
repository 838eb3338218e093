"""`colossalai run --hostfile` across two hosts, for real: network namespaces with an sshd each, sharing the file
system, whose own host names resolve to loopback (tests/netns_hosts.py). 2 hosts x 1 process train like 1 host x 2
processes, resume exactly, write each checkpoint/export file once, prune, survive losing a host, and leave no worker
behind a killed launcher or a cut ssh session; switched off, the interface choice gives back the original failure."""

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_distributed
from netns_hosts import WriteWatch
from test_network import PROBE
from test_train import tb_scalars
from transformers import AutoConfig, AutoModelForCausalLM

from colossal_shear.pruning.shape import PruneShape

pytestmark = pytest.mark.multihost

MASTER = "cs-node-1"
STEPS = 9  # every run here stops by step 9 of a 1000-step schedule, so runs of any length share one reference
_ports = iter(range(29600, 29700))


def _args(model_dir, dataset, out, *extra):
    return [
        "--pretrained",
        model_dir,
        "--dataset",
        dataset,
        "--plugin",
        "zero2",
        "--mixed_precision",
        "fp32",
        "--batch_size",
        2,
        "--max_steps",
        1000,
        "--lr",
        3e-3,
        "--warmup_steps",
        2,
        "--save_interval",
        3,
        "--save_dir",
        out / "ckpt",
        "--tensorboard_dir",
        out / "tb",
        *extra,
    ]


def _launch_cmd(cluster, args, nproc=1):
    return [
        "colossalai",
        "run",
        "--nproc_per_node",
        nproc,
        "--hostfile",
        cluster.hostfile(),
        "--master_addr",
        MASTER,
        "--master_port",
        next(_ports),
        "train.py",
        *args,
    ]


def launch(cluster, *args, env=None, check=True):
    """What a user on the first host types; returns the finished launcher (fails the test with its log)."""
    return cluster.run_on(
        cluster.hosts[0], _launch_cmd(cluster, args), env=cluster.env(**(env or {})), timeout=300, check=check
    )


def assert_losses(got_dir, expected, steps):
    got = tb_scalars(got_dir)
    for step in steps:
        assert got[step] == pytest.approx(expected[step], abs=1e-6, rel=0), f"step {step}: {got} vs {expected}"


@pytest.fixture(scope="module")
def reference(model_dir, dataset, tmp_path_factory):
    """1 host x 2 processes, steps 1..9: what every 2-host run here must reproduce step for step."""
    out = tmp_path_factory.mktemp("mh-reference")
    run_distributed(ROOT / "train.py", *_args(model_dir, dataset, out, "--stop_at_step", STEPS))
    losses = tb_scalars(out / "tb")
    assert sorted(losses) == list(range(1, STEPS + 1)) and losses[STEPS] < losses[1]
    return losses


def test_two_hosts_train_like_one_host_and_resume_exactly(cluster, model_dir, dataset, reference, tmp_path):
    first = launch(cluster, *_args(model_dir, dataset, tmp_path, "--stop_at_step", 6))
    for host in cluster.hosts:  # once per host, naming the interface that reaches the others
        assert re.search(rf"network: host {host.name} uses eth0 \({host.address}\)", first.stdout), first.stdout
    assert first.stdout.count("network: host") == 2
    assert_losses(tmp_path / "tb", reference, range(1, 7))
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step-0000006"

    launch(
        cluster, *_args(model_dir, dataset, tmp_path, "--stop_at_step", STEPS, "--load_checkpoint", tmp_path / "ckpt")
    )
    assert_losses(tmp_path / "tb", reference, range(1, STEPS + 1))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.yaml",
        "latest",
        "step-0000006",
        "step-0000009",
    ]


def test_interface_choice_inside_the_hosts(cluster):
    """A worker host takes the route to the master; the master, whose own name is loopback there and which sees no
    peer on the port, takes its only interface; an address with no route is an error naming it."""
    got = {}
    for host in cluster.hosts:
        proc = cluster.run_on(host, [sys.executable, "-c", PROBE, MASTER, "10.99.0.1"], timeout=60)
        got[host.name] = json.loads(proc.stdout)
    assert got["cs-node-2"][MASTER] == (
        "Choice(ifname='eth0', address='10.231.0.3', reason='it routes to MASTER_ADDR cs-node-1 (10.231.0.2)')"
    )
    assert got["cs-node-1"][MASTER].startswith(
        "Choice(ifname='eth0', address='10.231.0.2', reason='the only "
        "interface up (MASTER_ADDR cs-node-1 (127.0.1.1) resolves to loopback"
    )
    for host in cluster.hosts:
        assert got[host.name]["10.99.0.1"].startswith(
            f"NetworkError: MASTER_ADDR '10.99.0.1' (10.99.0.1: Network is unreachable) is unreachable from host "
            f"'{host.name}'"
        ), got


class Running:
    """A launcher started on the first host in the background, its output collected; stopping it also kills what it
    started on every host (a launcher killed outright leaves its remote sessions behind)."""

    def __init__(self, cluster, args, env=None):
        self.cluster, self.output = cluster, b""
        self.proc = cluster.popen_on(
            cluster.hosts[0],
            _launch_cmd(cluster, args),
            env=cluster.env(**(env or {})),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        os.set_blocking(self.proc.stdout.fileno(), False)

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    def _read(self, wait: float) -> bool:
        """Collect what is there (waiting up to `wait` s); False once the output has ended."""
        ready, _, _ = select.select([self.proc.stdout], [], [], wait)
        if not ready:
            return True
        chunk = self.proc.stdout.read()
        if chunk is None:
            return True
        self.output += chunk
        return bool(chunk)

    def until(self, done, guard: float = 240.0) -> bool:
        """Read output until `done()` holds or the launcher's output ends; `guard` only keeps a broken run from
        hanging the suite (it is no claim about time)."""
        deadline = time.monotonic() + guard
        while not done():
            if not self._read(0.05) or time.monotonic() > deadline:
                return done()
        return True

    def finish(self, guard: float = 240.0):
        """Read to the end of the output; the exit status, or None if `guard` s passed first."""
        self.until(lambda: False, guard)
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.cluster.kill_all_jobs()
        self.proc.stdout.close()


# gloo on cs-node-2 told to reach rank 0 at the address cs-node-1's name has on cs-node-1 (Debian's 127.0.1.1)
LOOPBACK_REFUSED = re.compile(r"Connection refused, remote=\[127\.0\.1\.1\]")


def test_without_the_interface_choice_gloo_connects_to_loopback(cluster, model_dir, dataset, tmp_path):
    """The original failure, with the choice switched off: a rank is sent to a peer's loopback address. The
    launcher is stopped at that evidence (gloo retries until its timeout, then each side fails in turn)."""
    run = Running(
        cluster,
        _args(model_dir, dataset, tmp_path, "--stop_at_step", 1),
        env={"COLOSSAL_SHEAR_AUTO_IFNAME": "0", "COLOSSAL_SHEAR_DIST_TIMEOUT": "5"},
    )
    try:
        found = run.until(lambda: LOOPBACK_REFUSED.search(run.text))
    finally:
        run.stop()
    assert found, run.text[-5000:]
    assert "network: host" not in run.text
    assert not (tmp_path / "tb").exists()  # no rank got as far as training


def _train_pids(host):
    out = []
    for pid in host.pids():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"train.py" in argv and not any(a.endswith(b"torchrun") for a in argv):
            out.append(pid)
    return out


def test_lost_host_ends_the_job_within_a_minute_then_it_resumes(cluster, model_dir, dataset, reference, tmp_path):
    """Every process of cs-node-2 killed after a checkpoint: its sockets close, so the survivor's next collective
    fails at once and the whole job ends with an error; the same command with --load_checkpoint then resumes from
    `latest` and follows the uninterrupted reference."""
    run = Running(cluster, _args(model_dir, dataset, tmp_path))  # 1000 steps: still running when killed
    latest = tmp_path / "ckpt" / "latest"
    try:
        assert run.until(latest.exists), run.text[-5000:]
        killed = cluster.kill_jobs(cluster.hosts[1])
        at = time.monotonic()
        rc = run.finish(guard=120)
        waited = time.monotonic() - at
        left = [pid for pid in cluster.hosts[0].pids() if pid != cluster.hosts[0].sshd.pid]
    finally:
        run.stop()
    assert killed and rc == 1, run.text[-5000:]
    assert waited < 60, f"the job took {waited:.0f} s to end after host cs-node-2 was lost"
    assert "cs-node-1: failure" in run.text and "cs-node-2: failure" in run.text, run.text[-5000:]
    assert re.search(r"(Connection reset by peer|Connection closed by peer)", run.text), run.text[-5000:]
    assert not left, "processes left running on the surviving host"

    resumed_from = int(latest.read_text().strip().removeprefix("step-"))
    assert resumed_from in (3, 6), f"killed too late (last checkpoint step {resumed_from})"
    launch(
        cluster,
        *_args(
            model_dir, dataset, tmp_path / "resumed", "--stop_at_step", STEPS, "--load_checkpoint", tmp_path / "ckpt"
        ),
    )
    got = tb_scalars(tmp_path / "resumed" / "tb")
    assert sorted(got) == list(range(resumed_from + 1, STEPS + 1))
    assert_losses(tmp_path / "resumed" / "tb", reference, range(resumed_from + 1, STEPS + 1))


def test_dist_timeout_bounds_the_wait_for_a_hung_host(cluster, model_dir, dataset, tmp_path):
    """A hung rank (stopped, so its connections stay open) is waited for until the process-group timeout, torch's
    30 minutes for gloo unless COLOSSAL_SHEAR_DIST_TIMEOUT says otherwise: with 8 s the survivor gives up after
    8000 ms. (colossalai run then still waits on the hung host's session: the test stops it.)"""
    run = Running(cluster, _args(model_dir, dataset, tmp_path), env={"COLOSSAL_SHEAR_DIST_TIMEOUT": "8"})
    timed_out = re.compile(r"Timed out waiting 8000ms")
    try:
        assert run.until((tmp_path / "ckpt" / "latest").exists), run.text[-5000:]
        hung = _train_pids(cluster.hosts[1])
        for pid in hung:
            os.kill(pid, signal.SIGSTOP)
        found = run.until(lambda: timed_out.search(run.text), guard=120)
    finally:
        run.stop()
    assert len(hung) == 1 and found, run.text[-5000:]


def test_prune_stage_on_two_hosts_writes_each_file_once(cluster, model_dir, dataset, tmp_path):
    """The prune stage across hosts, watched with fanotify: global rank 0's host writes every checkpoint and export
    file, once; the other host writes only its own rank-1.pt."""
    target = "48,2,3,128"
    watch = WriteWatch(cluster, tmp_path)
    try:
        launch(
            cluster,
            "--stage",
            "prune",
            "--target_shape",
            target,
            "--target_ramp_steps",
            2,
            "--export_dir",
            tmp_path / "export",
            *_args(model_dir, dataset, tmp_path, "--max_steps", 4, "--save_interval", 2),
        )
    finally:
        writes = watch.close()
    config = AutoConfig.from_pretrained(tmp_path / "export")
    assert PruneShape.from_config(config) == PruneShape.parse(target, AutoConfig.from_pretrained(model_dir))
    AutoModelForCausalLM.from_pretrained(tmp_path / "export")

    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.yaml",
        "latest",
        "step-0000002",
        "step-0000004",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directories left behind"
    canonical = {}
    for path, hosts in writes.items():  # directories written as .tmp-NAME, files as .NAME.tmp-XXXX, then renamed
        path = re.sub(r"(^|/)\.tmp-(step-\d+)-[^/]+", r"\1\2", path)  # .tmp-step-N-<job id>
        path = re.sub(r"(^|/)\.tmp-(step-\d+|export/)", r"\1\2", path)
        canonical.setdefault(re.sub(r"(^|/)\.([^/]+)\.tmp-[^/]+$", r"\1\2", path), []).extend(hosts)
    shared = {p: hosts for p, hosts in canonical.items() if len(set(hosts)) > 1}
    assert not shared, f"written by both hosts: {shared}"
    by_host2 = sorted(p for p, hosts in canonical.items() if "cs-node-2" in hosts)
    assert by_host2 == ["ckpt/step-0000002/rank-1.pt", "ckpt/step-0000004/rank-1.pt"], writes
    assert canonical.pop("ckpt/latest", []) == ["cs-node-1"] * 2, writes
    outputs = {p: hosts for p, hosts in canonical.items() if p.startswith(("ckpt/", "export/"))}
    twice = {p: hosts for p, hosts in outputs.items() if len(hosts) > 1}
    assert not twice, f"written more than once: {twice}"
    exported = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert exported and all(outputs.get(f"export/{name}") == ["cs-node-1"] for name in exported), writes


def _workers(host) -> list[int]:
    """The training processes of `host` (torchrun gives only them a LOCAL_RANK)."""
    out = []
    for pid in host.pids():
        try:
            if b"\0LOCAL_RANK=" in b"\0" + Path(f"/proc/{pid}/environ").read_bytes():
                out.append(pid)
        except OSError:
            continue
    return out


def _alive(pids) -> list[int]:
    out = []
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out.append(pid)
        except OSError:
            continue
    return out


@pytest.mark.parametrize("cut", ["launcher", "ssh"])
def test_no_worker_outlives_its_launcher_or_its_ssh_session(cut, cluster, model_dir, dataset, tmp_path):
    """SIGTERM to `colossalai run` (whose helpers then keep torchrun running on both hosts), or the ssh session to
    cs-node-2 cut (its sshd processes killed): the workers that lost their launcher ask to stop, every rank agrees
    in the step's decision, saves and exits; no worker is left on either host 30 s later."""
    run = Running(cluster, _args(model_dir, dataset, tmp_path, "--save_interval", 100000))
    try:
        assert run.until(lambda: re.search(r"^step 2 \|", run.text, re.M)), run.text[-5000:]
        workers = [pid for host in cluster.hosts for pid in _workers(host)]
        if cut == "launcher":
            os.kill(run.proc.pid, signal.SIGTERM)
        else:
            host = cluster.hosts[1]
            for pid in host.pids():
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if pid != host.sshd.pid and argv[0].startswith(b"sshd"):
                    os.kill(pid, signal.SIGKILL)
        run.until(lambda: not _alive(workers), guard=30)
        left = _alive(workers)
    finally:
        run.stop()
    assert len(workers) == 2 and not left, run.text[-5000:]
    stopped = re.findall(r"train\.py: stopped at step (\d+) \((.*)\): saved (\S+);", run.text)
    assert len(stopped) == 1, run.text[-5000:]
    step = int(stopped[0][0])
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == f"step-{step:07d}"


def _losses(logdir) -> dict:
    """The logged losses; none where a job was killed before its writer flushed any."""
    try:
        return tb_scalars(logdir)
    except KeyError:
        return {}


def _with_tb(args: list, tb) -> list:
    args = list(args)
    args[args.index("--tensorboard_dir") + 1] = tb
    return args


def test_one_job_per_save_dir_across_hosts(cluster, model_dir, dataset, reference, tmp_path):
    """A 2-host job holds its save_dir: a job started on the other host with the same save_dir (the file system is
    shared) is refused before its first step, naming the holder's host. After the whole job is killed its lock stays
    (nobody released it); from another host only its heartbeat can say it is stale (COLOSSAL_SHEAR_LOCK_STALE_S, here
    1 s): a job there takes it over with a notice, resumes (the killed job's losses where it logged the same
    steps) and releases the lock at exit."""
    run = Running(cluster, _args(model_dir, dataset, tmp_path))  # 1000 steps: still running
    latest = tmp_path / "ckpt" / "latest"
    second = _args(model_dir, dataset, tmp_path, "--load_checkpoint", tmp_path / "ckpt")
    try:
        assert run.until(latest.exists), run.text[-5000:]
        refused = cluster.run_on(
            cluster.hosts[1],
            [sys.executable, "train.py", *_with_tb(second, tmp_path / "refused-tb")],
            check=False,
            timeout=300,
        )
        still_running = run.proc.poll() is None
    finally:
        run.stop()
    assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-3000:]
    line = [l for l in refused.stderr.splitlines() if "is in use by job" in l]
    assert len(line) == 1 and "on cs-node-1" in line[0] and "job.lock" in line[0], refused.stderr[-3000:]
    assert still_running, "the running job was disturbed by the refused one"
    assert not (tmp_path / "refused-tb").exists(), "the refused job wrote logs"

    resumed_from = int(latest.read_text().strip().removeprefix("step-"))
    end = resumed_from + 2  # the killed job may have passed STEPS: it ran on while the refused one started
    args = _with_tb([*second, "--stop_at_step", end], tmp_path / "resumed-tb")
    time.sleep(1.5)  # the lock's heartbeat older than the 1 s limit below
    took_over = cluster.run_on(
        cluster.hosts[1],
        ["torchrun", "--standalone", "--nproc_per_node", 2, "train.py", *args],
        env=cluster.env(COLOSSAL_SHEAR_LOCK_STALE_S="1"),
        timeout=300,
    )
    assert "took over the stale lock" in took_over.stdout + took_over.stderr, took_over.stderr[-3000:]
    assert not (tmp_path / "ckpt" / "job.lock").exists(), "the lock was not released at exit"
    got, first = _losses(tmp_path / "resumed-tb"), _losses(tmp_path / "tb")
    assert sorted(got) == [resumed_from + 1, end], took_over.stdout[-3000:] + took_over.stderr[-3000:]
    assert [got[s] for s in got if s in first] == pytest.approx([first[s] for s in got if s in first], abs=1e-6)
