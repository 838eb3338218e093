"""Stopping a command cleanly on SIGTERM (what Slurm, Kubernetes and `kill` send) and SIGINT (Ctrl-C).

`cli.run` installs `handlers()` around a command's work: either signal raises `Interrupted` in the main thread, a
BaseException (like KeyboardInterrupt) that `except Exception` does not swallow, so every `finally` and context
manager on the way out runs (temporary directories are removed, pools terminated), and the CLI prints one line and
exits with 128 + the signal's number (143 for SIGTERM, 130 for SIGINT), as a shell reports a process the signal
ended. A library that keeps something for a resume says so by adding to `note`.

Worker processes call `worker_signals()` first: SIGINT (the terminal's Ctrl-C reaches the whole process group) is
left to the parent, which stops its workers; SIGTERM ends a worker at once and silently; and a worker whose parent
dies is sent SIGTERM (Linux), so it never outlives its parent or writes into a closed pipe (BrokenPipe tracebacks).
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """A signal asked this process to stop."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.note = ""  # what was kept or removed, said after "interrupted by SIGTERM"

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return f"interrupted by {signal.Signals(self.signum).name}" + (f": {self.note}" if self.note else "")


def _raise(signum, frame) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def handlers() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise Interrupted (main thread only; elsewhere nothing changes)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def worker_signals() -> None:
    """For a worker process of a pool (see the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
