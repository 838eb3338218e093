"""Atomic output directories: build next to the target, rename into place at the end.

A crash, a bad input found late or Ctrl-C leaves the target untouched (only a hidden `.NAME.tmp-*` sibling, removed
on the way out), so nothing is ever half-written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import VocabError


def check_target(target: Path, overwrite: bool, sources: tuple[Path, ...] = (), error=VocabError) -> None:
    """Refuse an existing target (unless `overwrite`) and a target that is one of the inputs, before any work."""
    target = Path(target)
    for src in sources:
        if src is not None and Path(src).resolve() == target.resolve():
            raise error(f"the target directory {target} is the source directory; choose another target")
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise error(f"the target {target} exists and is not a directory")
        if not overwrite:
            raise error(f"the target directory {target} already exists; pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_output_dir(target: Path, overwrite: bool = False, error=VocabError) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `target`; publish it as `target` only if the block succeeds."""
    target = Path(target)
    check_target(target, overwrite, error=error)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the published directory should look like any other
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, old / target.name)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
