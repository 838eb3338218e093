"""The one user-error base class: every CLI prints such an error as one line and exits 2; anything else is a bug
and keeps its traceback."""

from __future__ import annotations

import errno
import re


class UserError(Exception):
    """Bad input from the user (a flag, a file, a directory): fixable without reading our code."""


class ConfigError(UserError, ValueError):
    """A configuration value or key that cannot be used (one line naming the key and the source)."""


class TrainingError(UserError):
    """A training run that cannot start or go on: a bad option combination, a model or dataset that does not fit."""


class VocabError(UserError, ValueError):
    """Vocabulary adaptation: the message names the file (and line) or the flag at fault."""


class DiskFullError(UserError):
    """An output that did not fit: the message names the path, the OS's reason and the space involved."""


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def os_errno(error: BaseException) -> int | None:
    """The operating system's error number behind a failure, from the error or its chain (torch reports a failed
    write as "enforce fail at inline_container.cc" with the OSError as context), or from the "os error N" that
    safetensors and tokenizers (Rust) put in their messages; None when there is none."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return seen.errno
        match = re.search(r"os error (\d+)", str(seen))
        if match:
            return int(match.group(1))
        seen = seen.__cause__ or seen.__context__
    return None


def is_disk_full(error: BaseException) -> bool:
    """No space left on the device, or the disk quota exceeded."""
    return os_errno(error) in DISK_FULL


def failed_path(error: BaseException) -> str | None:
    """The file an OSError in the error's chain names, if any."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.filename:
            return str(seen.filename)
        seen = seen.__cause__ or seen.__context__
    return None


class Stopped(Exception):
    """The run stopped on request (a signal, its launcher gone) at a step boundary, after saving a checkpoint when it
    has a save_dir: not an error. Every CLI exits with `exit_code` (EX_TEMPFAIL) and the message as one line."""

    exit_code = 75
