"""Faults around checkpoints, each met as a user would meet it (2 CPU processes, the real Booster and files): a
corrupted, truncated or missing file, a stale `latest`, another layout, a pickled object, a full disk, a vocabulary
the 3d plugin pads. Each gives one clear error naming the file or a fallback said in one line (docs/reliability.md).
"""

import hashlib
import json
import os
import shutil
import stat
import time
from pathlib import Path

import pytest
import torch
from conftest import prepare_bundled_corpus, run_distributed
from test_train import TRAIN, _args, tb_scalars
from transformers import AutoModelForCausalLM

from colossal_shear.bundled import build_tiny_llama, train_sentencepiece

STEPS = ("step-0000003", "step-0000006", "step-0000008")


def _run_args(model_dir, dataset, tmp, *extra):
    return _args(model_dir, dataset, tmp, "--plugin", "zero2", "--keep_last", 3, *extra, steps=8)


@pytest.fixture(scope="module")
def saved(model_dir, dataset, tmp_path_factory):
    """An uninterrupted zero2 run (checkpoints at steps 3, 6, 8 and an export), written under umask 027."""
    root = tmp_path_factory.mktemp("saved")
    old = os.umask(0o027)
    try:
        run_distributed(TRAIN, *_run_args(model_dir, dataset, root, "--export_dir", root / "export"))
    finally:
        os.umask(old)
    return root


def _copy(saved, tmp_path) -> Path:
    shutil.copytree(saved / "ckpt", tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _fails(*args, nproc=2, env=None) -> str:
    """The log of a job that must fail promptly (a hang fails the test after two minutes)."""
    with pytest.raises(AssertionError) as err:
        run_distributed(TRAIN, *args, nproc=nproc, env=env, timeout=120)
    return str(err.value)


def _one_error(log: str, *parts: str) -> str:
    """The one `train.py: error:` line (printed once, not once per rank), which must contain every part."""
    lines = [line for line in log.splitlines() if "train.py: error:" in line]
    assert len(lines) == 1, log[-6000:]
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


def test_manifest_lists_every_file_and_files_follow_the_umask(saved):
    step = saved / "ckpt" / "step-0000008"
    manifest = json.loads((step / "manifest.json").read_text())
    assert manifest["layout"] == {
        "world_size": 2,
        "plugin": "zero2",
        "tp": 1,
        "pp": 1,
        "sp": 1,
        "zero_stage": 0,
        "dp_size": 2,
    }
    files = sorted(str(p.relative_to(step)) for p in step.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert sorted(manifest["files"]) == files
    for rel, meta in manifest["files"].items():
        data = (step / rel).read_bytes()
        assert meta == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, rel
    # written under umask 027: group-readable, whatever the writer (safetensors makes 0600 files)
    outputs = [saved / "ckpt", saved / "export"]
    for path in [p for root in outputs for p in [root, *root.rglob("*")]]:
        want = 0o750 if path.is_dir() else 0o640
        assert stat.S_IMODE(path.stat().st_mode) == want, f"{path}: {oct(path.stat().st_mode)}"
    assert list((saved / "export").glob("*.safetensors")) and list(step.glob("model/*.safetensors"))


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_corrupted_model_shard_is_refused_or_skipped_for_an_older_checkpoint(saved, model_dir, dataset, tmp_path):
    ckpt = _copy(saved, tmp_path)
    shard = next((ckpt / "step-0000008" / "model").glob("*.safetensors"))
    _overwrite(shard, shard.stat().st_size // 2, b"\xff" * 4096)
    args = _run_args(model_dir, dataset, tmp_path)
    log = _fails(*args, "--load_checkpoint", ckpt / "step-0000008")  # explicit: never a silent fallback
    _one_error(log, str(shard), "does not match its sha256")

    proc = run_distributed(TRAIN, *args, "--load_checkpoint", ckpt)
    notes = [line for line in proc.stdout.splitlines() if line.startswith("--load_checkpoint")]
    assert len(notes) == 1 and str(shard) in notes[0] and "resuming from step-0000006" in notes[0], proc.stdout
    expected, got = tb_scalars(saved / "tb"), tb_scalars(tmp_path / "tb")
    assert sorted(got) == [7, 8]
    for step in (7, 8):  # the older checkpoint resumes exactly: no NaN, the uninterrupted run's losses
        assert got[step] == pytest.approx(expected[step], abs=1e-6, rel=0)


@pytest.mark.parametrize(
    "victim", ["trainer_state.pt", "optimizer/pytorch_optim-00001.bin", "model/model-00001.safetensors"]
)
def test_truncated_file_is_refused_naming_it(victim, saved, model_dir, dataset, tmp_path):
    ckpt = _copy(saved, tmp_path)
    path = ckpt / "step-0000008" / victim
    path.write_bytes(path.read_bytes()[:1000])
    log = _fails(*_run_args(model_dir, dataset, tmp_path), "--load_checkpoint", ckpt / "step-0000008")
    _one_error(log, f"{path} has 1000 bytes", "truncated")


def test_latest_naming_a_missing_or_incomplete_step_falls_back_in_one_line(saved, model_dir, dataset, tmp_path):
    ckpt = _copy(saved, tmp_path)
    (ckpt / "latest").write_text("step-0000009")  # a step that is not there
    (ckpt / "step-0000008" / "manifest.json").unlink()  # and an incomplete one
    proc = run_distributed(TRAIN, *_run_args(model_dir, dataset, tmp_path), "--load_checkpoint", ckpt)
    notes = [line for line in proc.stdout.splitlines() if line.startswith("--load_checkpoint")]
    assert len(notes) == 1, proc.stdout
    assert "names step-0000009, which is missing" in notes[0] and "step-0000008" in notes[0], notes[0]
    assert "resuming from step-0000006" in notes[0]
    assert sorted(tb_scalars(tmp_path / "tb")) == [7, 8]


def test_a_rank_file_missing_is_one_error_from_every_rank(saved, model_dir, dataset, tmp_path):
    """Only rank 1 can see its file is missing: checked alone, rank 1 would stop while rank 0 loads and trains,
    waiting for it in a collective until the process group's timeout."""
    ckpt = _copy(saved, tmp_path)
    (ckpt / "step-0000006" / "rank-1.pt").unlink()
    started = time.monotonic()
    log = _fails(*_run_args(model_dir, dataset, tmp_path), "--load_checkpoint", ckpt / "step-0000006")
    assert time.monotonic() - started < 60, "the job took more than a minute to fail"
    _one_error(log, str(ckpt / "step-0000006" / "rank-1.pt"), "is missing")
    assert "Traceback" not in "".join(line for line in log.splitlines() if line.startswith("[rank")), log[-6000:]


def test_another_world_size_or_plugin_is_refused_before_loading(saved, model_dir, dataset, tmp_path):
    ckpt = _copy(saved, tmp_path)
    log = _fails(*_run_args(model_dir, dataset, tmp_path), "--load_checkpoint", ckpt, nproc=1)
    _one_error(
        log, "world_size 2", "dp_size 2", "this run has world_size 1", "dp_size 1", "resume with the same layout"
    )
    log = _fails(*_run_args(model_dir, dataset, tmp_path), "--plugin", "ddp", "--load_checkpoint", ckpt)
    _one_error(log, "plugin zero2", "this run has plugin ddp")


class _Payload:
    """Unpickling this creates a file: what a tampered optimizer shard could do if loaded without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_pickled_object_in_an_optimizer_shard_is_never_unpickled(saved, model_dir, dataset, tmp_path):
    ckpt = _copy(saved, tmp_path)
    step, marker = ckpt / "step-0000008", tmp_path / "code-ran"
    shard = step / "optimizer" / "pytorch_optim-00001.bin"
    state = torch.load(shard, weights_only=True)
    state[next(iter(state))]["payload"] = _Payload(str(marker))
    torch.save(state, shard)
    manifest = json.loads((step / "manifest.json").read_text())  # consistent, as a tamperer would make it
    data = shard.read_bytes()
    manifest["files"]["optimizer/pytorch_optim-00001.bin"] = {
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    (step / "manifest.json").write_text(json.dumps(manifest))
    # even where the environment turns torch.load's default back to full unpickling
    log = _fails(
        *_run_args(model_dir, dataset, tmp_path),
        "--load_checkpoint",
        step,
        env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"},
    )
    assert not marker.exists(), "the pickled object was loaded"
    _one_error(log, str(shard), "refused: it holds a pickled object")


def test_disk_full_while_saving_or_exporting(saved, small_fs, model_dir, dataset, tmp_path):
    one = sum(p.stat().st_size for p in (saved / "ckpt" / "step-0000003").rglob("*") if p.is_file())
    disk = small_fs("disk", int(one * 1.5))  # the first checkpoint fits, the second does not
    ckpt = disk / "ckpt"
    args = _run_args(model_dir, dataset, tmp_path)
    args[args.index("--save_dir") + 1] = ckpt
    log = _fails(*args)
    _one_error(
        log,
        f"saving checkpoint {ckpt / 'step-0000006'} failed: No space left on device",
        str(ckpt / ".tmp-step-0000006"),
        "latest still names step-0000003",
    )
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.yaml", "latest", "step-0000003"]  # no leftovers
    assert (ckpt / "latest").read_text() == "step-0000003"
    step = ckpt / "step-0000003"
    for rel, meta in json.loads((step / "manifest.json").read_text())["files"].items():  # the previous one is intact
        assert hashlib.sha256((step / rel).read_bytes()).hexdigest() == meta["sha256"], rel

    out = small_fs("export", one // 4)
    log = _fails(
        *_args(
            model_dir,
            dataset,
            tmp_path,
            "--plugin",
            "ddp",
            "--save_dir",
            tmp_path / "ok",
            "--export_dir",
            out / "model",
            steps=1,
        )
    )
    _one_error(log, f"exporting to {out / 'model'} failed: No space left on device")
    assert list(out.iterdir()) == []


@pytest.fixture(scope="module")
def vocab_3000(tmp_path_factory):
    """A real 3,000-piece tokenizer (not a multiple of 64: the 3d plugin pads it), a model and data of that vocab."""
    root = tmp_path_factory.mktemp("vocab3000")
    tok = train_sentencepiece(root / "tok", vocab_size=3000)
    model = build_tiny_llama(root / "model", tok)
    data = root / "data"
    prepare_bundled_corpus(tok, data)
    return model, data


@pytest.mark.parametrize("layout", [["--plugin", "3d"], ["--plugin", "3d", "--tp", "2"]], ids=["3d", "3d_tp2"])
def test_3d_with_a_vocabulary_it_pads_saves_resumes_exactly_and_exports(layout, vocab_3000, tmp_path):
    model_dir, data = vocab_3000
    full, part = tmp_path / "full", tmp_path / "part"
    run_distributed(TRAIN, *_args(model_dir, data, full, *layout, "--export_dir", full / "export"))
    run_distributed(TRAIN, *_args(model_dir, data, part, *layout, "--stop_at_step", 3))
    run_distributed(TRAIN, *_args(model_dir, data, part, *layout, "--load_checkpoint", part / "ckpt"))
    expected, got = tb_scalars(full / "tb"), tb_scalars(part / "tb")
    assert sorted(expected) == list(range(1, 7))
    for step in range(1, 7):
        assert got[step] == pytest.approx(expected[step], abs=1e-6, rel=0), f"step {step}: {got} vs {expected}"
    exported = AutoModelForCausalLM.from_pretrained(full / "export")
    assert exported.get_input_embeddings().weight.shape[0] == 3000
    assert exported.get_output_embeddings().weight.shape[0] == 3000
    assert exported.config.vocab_size == 3000
