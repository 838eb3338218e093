"""What every thin command-line script shares: its options come from one config dataclass (colossal_shear.config),
it runs one library call, and a user error prints one line and exits 2 (once per job, not once per rank). A full
disk (ENOSPC, EDQUOT) is such an error too, whatever raised it; SIGTERM and SIGINT stop the work through its
`finally` blocks (colossal_shear.core.interrupt) and exit 128 + the signal number with one line.
Internal bugs keep their traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from colossal_shear.core import config as configuration
from colossal_shear.core import interrupt, logger
from colossal_shear.core.errors import DiskFullError, Stopped, UserError, failed_path, is_disk_full, os_errno
from colossal_shear.data.config import PrepareConfig
from colossal_shear.eval.config import EvalConfig
from colossal_shear.pruning.config import OneShotConfig
from colossal_shear.report import ReportConfig
from colossal_shear.train.config import TrainConfig
from colossal_shear.vocab.config import ResizeConfig, TokenizerConfig

# script (relative to the repository root) -> its config dataclass; docs/cli.md is generated from these
CLIS = {
    "tokenizer/init_tokenizer.py": TokenizerConfig,
    "tokenizer/init_model.py": ResizeConfig,
    "data_prep/prepare_pretrain_dataset.py": PrepareConfig,
    "prune.py": OneShotConfig,
    "train.py": TrainConfig,
    "evaluate.py": EvalConfig,
    "colossal_shear/report.py": ReportConfig,  # python -m colossal_shear.report
}

log = logger.get_logger(__name__)

# OS errors about a path the user gave (its name is in the message) are user errors too
PATH_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


def parse(script: str, argv=None, description: str | None = None):
    """The script's config from YAML and flags; a bad value exits 2 with one line, like argparse's own errors."""
    prog = os.path.basename(script)
    try:
        return configuration.parse(CLIS[script], argv, prog=prog, description=description)
    except UserError as e:
        report(prog, e)
        sys.exit(2)


def run(script: str, work: Callable, show: Callable, argv=None, description: str | None = None) -> int:
    """Parse the script's options, run `work(config)`, `show` the result; 2 on a user error or a full disk,
    128 + N on signal N (SIGTERM, SIGINT) outside training, 75 when training stopped on request after saving."""
    cfg = parse(script, argv, description)
    prog = os.path.basename(script)
    try:
        with interrupt.handlers():
            result = work(cfg)
    except (interrupt.Interrupted, Stopped) as e:
        log.warning(f"{prog}: {e}")
        return e.exit_code
    except (UserError, *PATH_ERRORS) as e:
        report(prog, e)
        return 2
    except Exception as e:
        if not is_disk_full(e):
            raise
        where = f" (in {failed_path(e)})" if failed_path(e) else ""
        report(prog, DiskFullError(f"{os.strerror(os_errno(e))}{where}: {str(e).splitlines()[0]}"))
        return 2
    show(result)
    return 0


def report(prog: str, error: BaseException) -> None:
    """One line on stderr, once per job. Before the process group is up every rank meets the same user error (the
    checks run before ranks diverge), so it is shown by rank 0 (the logger's default), unless it is marked
    `rank_local`; after that, the first rank to meet a message prints it (`report_here`, set by
    colossal_shear.train.collective.fail)."""
    rank_local = getattr(error, "rank_local", False)
    if hasattr(error, "report_here") and not error.report_here:
        return  # another rank claimed this message and prints it
    shown = logger.HERE if rank_local or hasattr(error, "report_here") else None  # None: the logger's rank 0
    where = f"[rank {logger.rank()}] " if rank_local else ""
    message = " ".join(str(error).split("\n")) if str(error) else type(error).__name__
    log.error(f"{prog}: error: {where}{message}", extra=shown)


def cli_docs() -> str:
    """docs/cli.md: every CLI's flags, generated from the config dataclasses (a test fails when it drifts)."""
    parts = [
        "# Command-line flags\n",
        "Generated from the config dataclasses by `python -m colossal_shear.cli > docs/cli.md`; "
        "`tests/test_config.py` fails when this file and the code disagree. Every CLI also takes "
        "`--config FILE.yaml` (any of its options; flags given on the command line win) and `--help`. "
        "A bool option `--x` is switched off by the `--no_x` flag shown beside it. Options listed under a section "
        "(`### optim`) are flat flags all the same (`--lr`); in YAML they go under the section's name "
        "(`optim: {lr: 1e-4}`, as a run saves its `config.yaml`) or at the top level (`lr: 1e-4`).\n",
    ]
    for script in CLIS:
        cls = CLIS[script]
        doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        parts.append(f"## `{script}`\n\n{doc}\n\n{configuration.flag_table(cls)}\n")
    return "\n".join(parts)


if __name__ == "__main__":  # pragma: no cover - `python -m colossal_shear.cli > docs/cli.md`
    sys.stdout.write(cli_docs())
