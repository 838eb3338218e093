"""The package's one logger: every module logs through `get_logger(__name__)`, and no module prints or asks its rank.

Why one: a job of N processes must say each thing once. Records are shown on rank 0 only (RANK, as torchrun and
`colossalai run` set it); a record that only some rank can know (its own failure, its own interface) is marked
`extra=EVERY_RANK` and is then shown on every rank, prefixed `[rank N]` when the job has more than one process;
one that differs by host (the network interface it chose) is `extra=EVERY_HOST`, shown by each host's local rank 0;
and one this process says for the whole job (it claimed the message with `collective.claim_report`, or the message
names its rank itself) is `extra=HERE`, shown by the process that logs it. Nothing else asks the rank.

One format: the message alone, so the lines users read (and scripts grep) are what the code wrote. INFO and below go
to stdout, WARNING and above (and lines marked `extra=PROGRESS`) to stderr, both looked up when written (redirections
and pytest's capture apply) and through tqdm when a progress bar is on screen, so bars are not torn.
COLOSSAL_SHEAR_LOG_LEVEL (e.g. WARNING) quiets it.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "colossal_shear"
EVERY_RANK = {"every_rank": True}  # `log.info(msg, extra=EVERY_RANK)`: shown on every rank, not only rank 0
EVERY_HOST = {"every_host": True}  # shown as written by each host's local rank 0 (LOCAL_RANK), once per host
HERE = {"here": True}  # shown as written by the process that logs it: it speaks for the job (see above)
PROGRESS = {"progress": True}  # a progress line: a display, not a result, so on stderr like progress bars


def rank() -> int:
    """This process's global rank in the job (0 outside a distributed launch)."""
    return int(os.environ.get("RANK", "0") or 0)


def local_rank() -> int:
    """This process's rank on its host (LOCAL_RANK; 0 outside a distributed launch)."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "here", False):
            return True
        if getattr(record, "every_host", False):
            return local_rank() == 0
        if getattr(record, "every_rank", False):
            if world_size() > 1 and not getattr(record, "rank_prefixed", False):
                record.msg, record.rank_prefixed = f"[rank {rank()}] {record.msg}", True
            return True
        return rank() == 0


class _StreamHandler(logging.Handler):
    """stdout below WARNING, stderr from WARNING on and for progress lines; the stream is looked up at each record."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            to_stderr = record.levelno >= logging.WARNING or getattr(record, "progress", False)
            stream = sys.stderr if to_stderr else sys.stdout
            line = self.format(record)
            tqdm = sys.modules.get("tqdm")
            if tqdm is not None and getattr(tqdm.tqdm, "_instances", None):
                tqdm.tqdm.write(line, file=stream)
            else:
                stream.write(line + "\n")
            stream.flush()
        except Exception:  # a closed pipe must not take the job down with a logging traceback
            self.handleError(record)


def _configure() -> logging.Logger:
    root = logging.getLogger(ROOT)
    if not any(isinstance(h, _StreamHandler) for h in root.handlers):
        handler = _StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(_RankFilter())
        root.addHandler(handler)
        root.setLevel(os.environ.get("COLOSSAL_SHEAR_LOG_LEVEL", "INFO").upper())
        root.propagate = False
    return root


def get_logger(name: str) -> logging.Logger:
    """The logger for a module of the package (pass `__name__`)."""
    _configure()
    return logging.getLogger(name if name == ROOT or name.startswith(ROOT + ".") else f"{ROOT}.{name}")
