"""Shared, real fixtures: the bundled SentencePiece tokenizer and tiny Llama models, built once per pytest run.

The suite runs on the CPU even on a machine with a GPU: CUDA is hidden from this process and from everything it
launches (CUDA_VISIBLE_DEVICES=""), except the processes of `gpu`-marked tests, which launch with `gpu_env()`. Those
tests skip with the reason on a machine without an NVIDIA GPU and a CUDA build of torch."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from colossal_shear.bundled import FAMILY_CONFIGS, build_bundled, build_tiny_family, corpus_files
from colossal_shear.data import PrepareConfig, prepare_dataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))  # bench/assets_fetch.py: real external assets, shared with the benchmarks
# frequent Chinese words and phrases (from the bundled zh reviews), pieces to add in vocabulary-expansion tests
ZH_WORDS = "这本 知道 书中 套书 世界 不会 一次 一下 不好 有点 网上 特别 看过 拿到 之后 一直".split()
ZH_WORDS += "需要 地方 这本书很 我觉得 不知道 非常喜欢 值得一看 是一本好书".split()
_VISIBLE_DEVICES = os.environ.get("CUDA_VISIBLE_DEVICES")
os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything initialises CUDA in this process


def gpu_env() -> dict:
    """The environment with the GPU(s) visible again: for what `gpu`-marked tests launch."""
    env = dict(os.environ)
    if _VISIBLE_DEVICES is None:
        env.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        env["CUDA_VISIBLE_DEVICES"] = _VISIBLE_DEVICES
    return env


def gpu_missing() -> str | None:
    """Why `gpu` tests cannot run here, or None. Asks nvidia-smi, so this process never initialises CUDA."""
    import torch

    if torch.version.cuda is None:
        return f"needs a CUDA build of torch (this is torch {torch.__version__})"
    if _VISIBLE_DEVICES == "" or shutil.which("nvidia-smi") is None:
        return "needs an NVIDIA GPU (no nvidia-smi, or CUDA_VISIBLE_DEVICES is empty)"
    proc = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    if proc.returncode != 0 or "GPU" not in proc.stdout:
        return "needs an NVIDIA GPU (nvidia-smi lists none)"
    return None


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    reason = gpu_missing() if gpu_items else None
    for item in gpu_items:
        if reason:
            item.add_marker(pytest.mark.skip(reason=f"gpu test: {reason}"))


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


FAMILIES = tuple(FAMILY_CONFIGS)  # parametrise family tests over these


@pytest.fixture(scope="session")
def family_model(bundled, tmp_path_factory):
    """`family_model("qwen3", tie_word_embeddings=True)`: a tiny random model directory of a family (a key of
    `bundled.FAMILY_CONFIGS`, with config overrides), built once per pytest run."""
    root = tmp_path_factory.mktemp("families")

    def build(family: str, **overrides) -> Path:
        name = family + "".join(f"-{k}={v}" for k, v in sorted(overrides.items()))
        return build_tiny_family(family, root / name, bundled["tokenizer"], **overrides)

    return build


def prepare_bundled_corpus(tokenizer_dir, out, bins: int = 2, seed: int = 42) -> Path:
    """The bundled corpus prepared for training with a tokenizer: 64-token sequences in `bins` parts."""
    config = PrepareConfig(
        data_input_dirs=[str(p) for p in corpus_files()],
        tokenizer_dir=str(tokenizer_dir),
        data_output_dirs=str(out),
        max_length=64,
        num_spliced_dataset_bins=bins,
        num_proc=1,
        progress=False,
        seed=seed,
    )
    prepare_dataset(config)
    return Path(out)


@pytest.fixture(scope="session")
def dataset(tokenizer_dir, tmp_path_factory) -> Path:
    """The bundled corpus prepared with the bundled tokenizer (read-only: tests that change it copy it first)."""
    return prepare_bundled_corpus(tokenizer_dir, tmp_path_factory.mktemp("data") / "prepared")


@pytest.fixture(scope="module")
def cluster():
    """Two hosts made of network namespaces, each with an sshd (multihost tests; skipped, saying why, without root)."""
    from netns_hosts import Cluster, Unavailable, check_can_make_namespaces, ensure_sshd

    try:
        check_can_make_namespaces()
    except Unavailable as e:
        pytest.skip(str(e))
    ensure_sshd()
    hosts = Cluster(2)
    yield hosts
    hosts.close()


def run_distributed(script, *args, nproc=2, launcher="torchrun", timeout=600, env=None, gpu=False):
    """Run a script on `nproc` processes the way users launch (torchrun or colossalai run); fail with its log. CPU
    processes unless `gpu` (for `gpu`-marked tests)."""
    bindir = Path(sys.executable).parent
    if launcher == "torchrun":
        cmd = [str(bindir / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", str(script), *map(str, args)]
    else:
        cmd = [
            str(bindir / "colossalai"),
            "run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(_free_port()),
            str(script),
            *map(str, args),
        ]
    full_env = {
        **(gpu_env() if gpu else os.environ),
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "PATH": f"{bindir}:{os.environ['PATH']}",
        **(env or {}),
    }
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def small_fs(tmp_path):
    """Mount real, small tmpfs file systems (root only); unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = []

    def mount(name: str, size_bytes: int) -> Path:
        path = tmp_path / name
        path.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=True)
