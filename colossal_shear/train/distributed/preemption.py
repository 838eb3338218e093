"""Stopping a run on request: a signal (what Slurm and Kubernetes send before they kill a job), or the launcher gone.

`install()` (called by `trainer.train` before anything else) makes SIGTERM, SIGINT and SIGUSR1 (Slurm's `--signal`)
record a request instead of killing the process or raising KeyboardInterrupt, and starts a watcher thread. The
request is only a flag: the trainer adds it to the one all-reduce it makes per optimizer step (`Trainer._decide`),
so every rank learns at the same step boundary that some rank was asked to stop, wherever the signal arrived (only
the launcher, which forwards it: torchrun sends the signal it got to its workers and SIGKILLs them after its
`--shutdown_timeout`, 30 s by default; only some ranks; or all of them). Every rank then saves the checkpoint
together and exits with 75 (`core.errors.Stopped.exit_code`, EX_TEMPFAIL: "try again later"): see
docs/reliability.md and the README's "Preemption".

The watcher thread notices a launcher that is gone: the worker's parent (torchrun's agent) and, under
`colossalai run`, every process up to the `colossalai run` that started it on this host, or up to the ssh session
that started torchrun on another host (a non-interactive `sshd: user@notty`). Nobody will stop this worker any more,
so it asks to stop like a signal does and, `COLOSSAL_SHEAR_STOP_GRACE` seconds later (25 by default) if it is still
running (a peer that cannot agree, a save that hangs), ends the process itself (status 1). Linux only (/proc);
elsewhere only the parent is watched. `COLOSSAL_SHEAR_WATCH_LAUNCHER=0` switches the watch off.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from colossal_shear.core.logger import EVERY_RANK, get_logger

SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
GRACE_VAR = "COLOSSAL_SHEAR_STOP_GRACE"
WATCH_VAR = "COLOSSAL_SHEAR_WATCH_LAUNCHER"  # 0: do not watch the launcher (a worker meant to outlive it)
DEFAULT_GRACE = 25.0
POLL_SECONDS = 0.5

log = get_logger(__name__)


class _Request:
    def __init__(self):
        self.reason: str | None = None
        self.launcher_gone_at: float | None = None
        self.installed = False


_request = _Request()


def requested() -> bool:
    """Whether this process was asked to stop (a signal, or its launcher gone)."""
    return _request.reason is not None


def reason() -> str | None:
    return _request.reason


def request(why: str) -> None:
    """Ask this process to stop at the next step boundary (the first reason is kept)."""
    if _request.reason is None:
        _request.reason = why


def _on_signal(signum, frame) -> None:  # only sets a flag: safe wherever the main thread was interrupted
    request(signal.Signals(signum).name)
    if signum == signal.SIGINT:  # a second Ctrl-C interrupts at once (KeyboardInterrupt), as it did before
        signal.signal(signal.SIGINT, signal.default_int_handler)


def install() -> None:
    """Handle SIGTERM, SIGINT and SIGUSR1 as stop requests and watch the launcher. From the main thread; idempotent."""
    if threading.current_thread() is not threading.main_thread() or _request.installed:
        return
    _request.installed = True
    for name in SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _on_signal)
    watched = launcher_chain()
    if watched:
        threading.Thread(
            target=_watch, args=(watched, grace_seconds()), name="colossal_shear-launcher-watch", daemon=True
        ).start()


def grace_seconds() -> float:
    value = os.environ.get(GRACE_VAR, "").strip()
    try:
        return float(value) if value else DEFAULT_GRACE
    except ValueError:
        return DEFAULT_GRACE


# --- the launcher -----------------------------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of a live process from /proc, None when it is gone (or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), fields[0], int(fields[19])


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _is_ssh_command(argv: list[str]) -> bool:
    """sshd's process for a non-interactive command (`sshd: user@notty`, `sshd-session: user@notty`): how
    `colossalai run` (and pdsh, mpirun) start the launcher on other hosts. An interactive login has a tty instead."""
    return bool(argv) and argv[0].startswith(("sshd:", "sshd-session:")) and argv[0].endswith("@notty")


def _is_colossalai_run(argv: list[str]) -> bool:
    return any(os.path.basename(a) == "colossalai" for a in argv[:3]) and "run" in argv[1:4]


def launcher_chain(max_depth: int = 12) -> list[tuple[int, int]]:
    """(pid, start time) of the processes whose end means this worker's launcher is gone: its parent and, above
    it, up to the topmost `colossalai run` of this host or else up to the first sshd (a host `colossalai run`
    reached over ssh). Under a plain `python train.py` (no launcher) or with COLOSSAL_SHEAR_WATCH_LAUNCHER=0,
    nothing."""
    if "LOCAL_RANK" not in os.environ or os.environ.get(WATCH_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        return []
    parent = os.getppid()
    if not os.path.exists(f"/proc/{parent}/stat"):  # no /proc: the parent only, through getppid
        return [(parent, -1)]
    chain, pid = [], parent
    while pid > 1 and len(chain) < max_depth:
        stat = _stat(pid)
        if stat is None:
            break
        chain.append((pid, stat[2]))
        pid = stat[0]
    cut = 1
    for i, (pid, _) in enumerate(chain):
        if _is_colossalai_run(_cmdline(pid)):
            cut = i + 1
    if cut == 1:
        sshd = next((i for i, (pid, _) in enumerate(chain) if _is_ssh_command(_cmdline(pid))), None)
        cut = 1 if sshd is None else sshd + 1
    return chain[:cut]


def gone(chain: list[tuple[int, int]]) -> int | None:
    """The first process of `chain` that has ended (or was replaced by another with its pid), else None."""
    for pid, started in chain:
        if started == -1:
            if os.getppid() != pid:
                return pid
            continue
        stat = _stat(pid)
        if stat is None or stat[2] != started:
            return pid
    return None


def _watch(chain: list[tuple[int, int]], grace: float) -> None:
    while True:
        time.sleep(POLL_SECONDS)
        if _request.launcher_gone_at is None:
            pid = gone(chain)
            if pid is not None:
                _request.launcher_gone_at = time.monotonic()
                request(f"the launcher (pid {pid}) is gone")
                log.warning(
                    f"the launcher (pid {pid}) is gone: stopping at the next step boundary (saving if every rank "
                    f"agrees), or in {grace:.0f} s ({GRACE_VAR})",
                    extra=EVERY_RANK,
                )
        if _request.launcher_gone_at is not None and time.monotonic() - _request.launcher_gone_at > grace:
            log.error(
                f"still running {grace:.0f} s after the launcher went ({GRACE_VAR}): exiting without a save",
                extra=EVERY_RANK,
            )
            os._exit(1)
