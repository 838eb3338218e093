"""Atomic publication: the one way this package writes an output directory or a single file.

A directory is built in a hidden sibling `.NAME.tmp-XXXXXXXX` of its target and renamed into place only when
complete; a file is written to a hidden sibling and renamed over its target. A crash, a bad input found late or
Ctrl-C therefore leaves the target as it was (absent, or the previous version) and removes the temporary, so nothing
is ever half-written. Both renames stay on one file system (siblings), where rename is atomic.

Permissions: what is published looks like anything else the user creates, whatever `tempfile` or a writer does
(tempfile makes 0700 directories and 0600 files, and so does safetensors' `save_file`): directories get
0o777 & ~umask, files 0o666 & ~umask (0755 / 0644 under umask 022, 0750 / 0640 under umask 027); `publish_dir`
applies that to everything inside before the rename. `copy_tokenizer_files` copies contents, not the source's mode.

    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:   # build everything in tmp
        model.save_pretrained(tmp)
    atomic_write_text(path / "latest", "step-0000100")

For a temporary directory whose name other processes must know in advance (several ranks writing one checkpoint),
create it yourself (`Path.mkdir` respects the umask) and call `publish_dir(tmp, target, overwrite)` at the end.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from colossal_shear.core.constants import TOKENIZER_FILES
from colossal_shear.core.errors import DiskFullError, failed_path, is_disk_full, os_errno


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux), else by setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temp_dir(target: str | os.PathLike, kind: str = "tmp") -> Path:
    """A fresh, empty `.NAME.<kind>-XXXXXXXX` directory beside `target` (its parents created), with the mode a new
    directory gets under the umask."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def apply_umask(root: str | os.PathLike) -> None:
    """Give `root` and everything under it the umask's modes (keeping executable bits executable): writers that
    create files 0600 would otherwise lock colleagues on a shared file system out of the output."""
    mask = current_umask()
    for dirpath, _, files in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, (0o777 if os.stat(path).st_mode & 0o111 else 0o666) & ~mask)


def file_digests(paths: Sequence[str | os.PathLike], threads: int | None = None) -> dict[str, tuple[int, str]]:
    """{path: (size, sha256 hex)} of each file, read in parallel threads (hashlib releases the GIL on large
    buffers, so this runs at disk speed rather than at one core's hashing speed)."""

    def digest(path) -> tuple[int, str]:
        h, size = hashlib.sha256(), 0
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(1 << 23):
                h.update(chunk)
                size += len(chunk)
        return size, h.hexdigest()

    workers = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(map(str, paths), pool.map(digest, paths)))


def publish_dir(tmp: str | os.PathLike, target: str | os.PathLike, overwrite: bool = False) -> Path:
    """Rename the finished directory `tmp` to `target` (a sibling: same file system) and return `target`, its
    contents given the umask's modes (`apply_umask`).

    - `target` absent, or an empty directory: `tmp` takes its place.
    - `target` exists otherwise: FileExistsError, unless `overwrite`; then the old target is moved aside, `tmp` is
      renamed into place and only then is the old one deleted. If that rename fails the old target is moved back,
      so at every moment `target` is either the complete old or the complete new output.
    `tmp` is left for the caller to remove when this raises (`atomic_dir` does).
    """
    tmp, target = Path(tmp), Path(target)
    apply_umask(tmp)
    if _is_empty_dir(target):
        target.rmdir()
    if not os.path.lexists(target):
        try:
            os.rename(tmp, target)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):  # created meanwhile by someone else
                raise FileExistsError(f"{target} exists and is not empty (pass overwrite)") from e
            raise
        return target
    if not overwrite:
        raise FileExistsError(f"{target} exists and is not empty (pass overwrite)")
    aside = make_temp_dir(target, "old")
    os.rename(target, aside / target.name)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(aside / target.name, target)
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)
    return target


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `target`; when the block succeeds, publish it as `target`
    (`publish_dir`). Whatever happens, the temporary directory is gone afterwards.

    keep_existing: a `target` that exists (non-empty) at publication was built meanwhile by another process (a
    shared cache): keep that one and discard this one instead of raising FileExistsError.
    """
    target = Path(target)
    tmp = make_temp_dir(target)
    try:
        yield tmp
        try:
            publish_dir(tmp, target, overwrite)
        except FileExistsError:
            if not keep_existing:
                raise
    except Exception as e:
        if is_disk_full(e):
            raise disk_full(e, f"writing {target}", tmp) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after publication there is nothing left here


def tree_bytes(root: str | os.PathLike) -> int:
    """Bytes in the files under `root` (0 when it is gone)."""
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def disk_full(error: BaseException, what: str, tmp: str | os.PathLike, cleanup=None) -> DiskFullError:
    """The one-line error for an output that did not fit, once the temporary `tmp` it was built in is removed (or
    `cleanup()` has removed what is not kept): `<what> failed: No space left on device (in <file>): <size of tmp>
    written before the file system filled up; <free> free there now`, so the user knows at least how much more it
    needs. The CLI prints it and exits 2 (`cli.run`)."""
    tmp = Path(tmp)
    written = tree_bytes(tmp)
    if cleanup is not None:
        cleanup()
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    where = tmp if tmp.exists() or not tmp.parent.exists() else tmp.parent
    try:
        free = f"; {human_bytes(shutil.disk_usage(where).free)} free there now"
    except OSError:
        free = ""
    reason = os.strerror(os_errno(error) or errno.ENOSPC)
    return DiskFullError(
        f"{what} failed: {reason} (in {failed_path(error) or tmp}): {human_bytes(written)} written before the file "
        f"system filled up{free}"
    )


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a hidden sibling renamed over it (flushed to disk first), so a reader sees
    the old content or the new, never a part; the file gets the umask's mode. Parents are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(name, 0o666 & ~current_umask())
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """`atomic_write_bytes` for text."""
    return atomic_write_bytes(path, text.encode(encoding))


def check_target(
    target: str | os.PathLike,
    overwrite: bool,
    sources: Sequence[str | os.PathLike | None] = (),
    error: type[Exception] = FileExistsError,
) -> None:
    """Refuse, before any work, a target directory that exists (even empty) unless `overwrite`, a target that is
    not a directory, and a target that is one of the `sources`; `error` is the exception type raised."""
    target = Path(target)
    for src in sources:
        if src is not None and Path(src).resolve() == target.resolve():
            raise error(f"the target directory {target} is the source directory; choose another target")
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise error(f"the target {target} exists and is not a directory")
        if not overwrite:
            raise error(f"the target directory {target} already exists; pass --overwrite to replace it")


def copy_tokenizer_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[str]:
    """Copy the `TOKENIZER_FILES` that `src_dir` has into `dst_dir` (contents only: the copies get the umask's
    mode); return their names."""
    src, dst, copied = Path(src_dir), Path(dst_dir), []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def outside(root: str | os.PathLike, rel) -> str | None:
    """Why `rel`, a path read from a file kept in `root` (a manifest entry, a pointer), must not be opened as
    root/rel, or None: it must be a non-empty relative path without `..` whose real path (symlinks followed) stays
    inside root. A file naming anything else is treated like a corrupted one by its readers."""
    if not isinstance(rel, str) or not rel or "\0" in rel:
        return "is not a relative path"
    if os.path.isabs(rel) or rel.startswith("~"):
        return "is an absolute path"
    if ".." in Path(rel).parts:
        return "goes up ('..')"
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(os.path.join(root, rel))]) != real_root:
        return f"leads outside {root} (a symlink)"
    return None


SAMPLE_BYTES = 1 << 20


def sampled_fingerprint(root: str | os.PathLike, paths: Sequence[str | os.PathLike]) -> str:
    """A cheap sha256 fingerprint of large files (model weights, Arrow parts): each file's path relative to `root`,
    its size, and its first and last MiB (the whole file when smaller). Two different trainings or shuffles differ
    there in practice; reading a few MiB instead of gigabytes keeps it instant."""
    h = hashlib.sha256()
    for path in paths:
        size = os.path.getsize(path)
        h.update(f"{os.path.relpath(path, root)}\0{size}\0".encode())
        with open(path, "rb") as f:
            h.update(f.read(SAMPLE_BYTES))
            if size > SAMPLE_BYTES:
                f.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()
