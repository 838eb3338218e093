"""One job per save_dir: `SAVE_DIR/job.lock` names the job that holds it (host, pid, start time, job id).

Rank 0 takes it before the first step, the ranks agree on the outcome, and it is released when the job exits (also
after an error). A second job on the same save_dir is refused in one line naming the holder. Created atomically on a
shared file system too: the holder's record is written to a unique file that is then hard-linked to `job.lock`
(link is atomic on NFS, where O_EXCL was not always; success is checked by the link count).

A lock left by a job that died without releasing it (SIGKILL, a lost node) is stale, and the next job takes it over
with a notice:

- same host: its pid is no longer running;
- any host: its heartbeat is old. The holder touches the lock file every HEARTBEAT_S seconds; a lock whose
  modification time is older than `COLOSSAL_SHEAR_LOCK_STALE_S` seconds (default 600) is stale. File systems shared
  between hosts keep one modification time for all of them (the server's clock on NFS).

Taking over moves the stale lock aside under a unique name, checks that it was the one judged stale (not a lock
another job took meanwhile) and then creates a fresh one. `job` (from SLURM_JOB_ID, TORCHELASTIC_RUN_ID or random)
names this job's temporary checkpoint directories (`.tmp-step-N-<job>`), so two jobs never share one; the holder
removes the `.tmp-step-*` directories of earlier jobs, which no live job can be writing.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import os
import shutil
import socket
import threading
import uuid
from pathlib import Path

from colossal_shear.core.logger import get_logger
from colossal_shear.train.distributed.collective import agree, gather

LOCK = "job.lock"
HEARTBEAT_S = 60
log = get_logger(__name__)


def stale_after_s() -> float:
    return float(os.environ.get("COLOSSAL_SHEAR_LOCK_STALE_S", 600))


def job_id() -> str:
    """This job's id: the scheduler's or the launcher's when there is one (the same on every rank), else random."""
    given = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID") or ""
    safe = "".join(c for c in given if c.isalnum() or c in "-_")[:32]
    return f"{safe}-{uuid.uuid4().hex[:8]}" if safe else uuid.uuid4().hex[:12]


class LockHeld(Exception):
    """The save_dir is held by a live job (the message names it)."""


def _describe(holder: dict) -> str:
    return f"job {holder.get('job')} (pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')})"


def _pid_running(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # another user's process (or an unreadable record: judged by its heartbeat)
    return True


def stale_reason(path: Path, holder: dict) -> str | None:
    """Why the lock at `path`, holding `holder`, is stale, or None while its holder may be alive."""
    try:
        age = datetime.datetime.now().timestamp() - path.stat().st_mtime
    except FileNotFoundError:
        return "it is gone"
    if holder.get("host") == socket.gethostname() and not _pid_running(holder.get("pid")):
        return f"pid {holder.get('pid')} is no longer running on {holder.get('host')}"
    if age > stale_after_s():
        return f"its heartbeat is {age:.0f} s old (stale after {stale_after_s():.0f} s)"
    return None


def _read(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


class SaveDirLock:
    """The lock of one save_dir, held by this process (rank 0) until `release` or exit."""

    def __init__(self, save_dir: str | os.PathLike, job: str):
        self.save_dir, self.path, self.job = Path(save_dir), Path(save_dir) / LOCK, job
        self.record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "job": job,
        }
        self._stop = threading.Event()
        self.held = False

    def acquire(self) -> str | None:
        """Take the lock (raise LockHeld naming a live holder); return a notice when a stale one was taken over."""
        self.save_dir.mkdir(parents=True, exist_ok=True)
        notice = None
        for _ in range(5):
            if self._create():
                break
            holder = _read(self.path)
            why = stale_reason(self.path, holder)
            if why is None:
                raise LockHeld(
                    f"--save_dir {self.save_dir} is in use by {_describe(holder)} ({self.path}): one job per "
                    "save_dir; if that job is gone, remove the lock file"
                )
            if self._take_over(holder):
                notice = f"--save_dir {self.save_dir}: took over the stale lock of {_describe(holder)}: {why}"
        else:
            raise LockHeld(f"--save_dir {self.save_dir}: could not take {self.path} (other jobs keep taking it)")
        self.held = True
        atexit.register(self.release)
        threading.Thread(target=self._heartbeat, name="save_dir-lock", daemon=True).start()
        self._remove_stale_temporaries()
        return notice

    def _create(self) -> bool:
        mine = self.save_dir / f".{LOCK}.{self.job}"
        mine.write_text(json.dumps(self.record))
        try:
            with contextlib.suppress(FileExistsError):
                os.link(mine, self.path)
            return os.stat(mine).st_nlink == 2
        finally:
            mine.unlink()

    def _take_over(self, seen: dict) -> bool:
        """Move the stale lock aside; True when it was the one judged stale (else it is put back)."""
        aside = self.save_dir / f".{LOCK}.stale-{self.job}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False  # another job took it over first: try again
        taken = _read(aside) == seen
        if not taken:  # a fresh lock another job took meanwhile: give it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        aside.unlink()
        return taken

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if _read(self.path).get("job") == self.job:
                with contextlib.suppress(OSError):
                    os.utime(self.path)

    def _remove_stale_temporaries(self) -> None:
        for tmp in self.save_dir.glob(".tmp-step-*"):
            if tmp.is_dir() and not tmp.name.endswith(f"-{self.job}"):
                shutil.rmtree(tmp, ignore_errors=True)

    def release(self) -> None:
        """Remove the lock if this job still holds it (idempotent)."""
        self._stop.set()
        if self.held and _read(self.path).get("job") == self.job:
            with contextlib.suppress(OSError):
                self.path.unlink()
        self.held = False


def lock_save_dir(save_dir) -> SaveDirLock | None:
    """Rank 0 takes `save_dir`'s lock before the job writes anything; every rank learns the outcome (one error naming
    the holder, printed once) and the job id. None without a save_dir."""
    import torch.distributed as dist

    if not save_dir:
        return None
    lock, problem = None, None
    if not dist.is_initialized() or dist.get_rank() == 0:
        lock = SaveDirLock(save_dir, job_id())
        try:
            notice = lock.acquire()
            if notice:
                log.info(notice)
        except (LockHeld, OSError) as e:
            problem = str(e)
    problem, job = gather((problem, None if lock is None else lock.job))[0]  # rank 0's outcome, on every rank
    agree(problem is None, problem or "")
    if lock is None:
        lock = SaveDirLock(save_dir, job)  # not held here: rank 0 holds it for the job
    return lock
