"""Shared, real fixtures: the bundled SentencePiece tokenizer and tiny Llama models, built once per pytest run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from colossal_shear.bundled import build_bundled

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def bundled(tmp_path_factory) -> dict:
    """{'tokenizer': dir, 'model': dir (untied), 'model_tied': dir}: real files, built on first use."""
    return build_bundled(tmp_path_factory.mktemp("bundled"))


@pytest.fixture(scope="session")
def tokenizer_dir(bundled) -> Path:
    return bundled["tokenizer"]


@pytest.fixture(scope="session")
def model_dir(bundled) -> Path:
    return bundled["model"]


@pytest.fixture(scope="session")
def tied_model_dir(bundled) -> Path:
    return bundled["model_tied"]


def run_distributed(script, *args, nproc=2, launcher="torchrun", timeout=600, env=None):
    """Run a script on `nproc` CPU processes the way users launch (torchrun or colossalai run); fail with its log."""
    bindir = Path(sys.executable).parent
    if launcher == "torchrun":
        cmd = [str(bindir / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", str(script), *map(str, args)]
    else:
        cmd = [str(bindir / "colossalai"), "run", "--nproc_per_node", str(nproc), "--master_port",
               str(_free_port()), str(script), *map(str, args)]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": f"{bindir}:{os.environ['PATH']}",
                **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
