"""Resumable and sharded data preparation (issue 25): SIGKILL at about half, the same command resumes with the units
left and the result is byte-identical to an uninterrupted run; changed arguments or inputs are refused, naming what
changed; shards (unit i -> shard i mod N) merged by one run give the one-run result.

The CLI runs as a real subprocess and is killed with SIGKILL (no cleanup of any kind runs)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from test_data_prep import L

from colossal_shear.bundled import corpus_files
from colossal_shear.data import DataPrepError, PrepareConfig, prepare_dataset

UNIT = 64 << 10  # 64 KiB units: the corpus below makes about 40 of them


def all_bytes(out: Path) -> dict[str, bytes]:
    return {str(f.relative_to(out)): f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("resume-corpus")
    for path in corpus_files():
        data = path.read_bytes()
        (d / path.name).write_bytes(data * 8)  # about 2.3 MB in 3 files
    return d


def cli(corpus: Path, tok, out: Path, *extra) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "data_prep" / "prepare_pretrain_dataset.py"),
        "--data_input_dirs",
        str(corpus),
        "--tokenizer_dir",
        str(tok),
        "--data_output_dirs",
        str(out),
        "--max_length",
        str(L),
        "--num_spliced_dataset_bins",
        "3",
        "--num_proc",
        "1",
        "--unit_bytes",
        str(UNIT),
        "--no_progress",
        *map(str, extra),
    ]


ENV = {**os.environ, "PYTHONPATH": str(ROOT), "WORLD_SIZE": "1"}


def units_done(work: Path) -> int:
    units = work / "units"
    return sum(1 for p in units.iterdir() if p.suffix == ".json") if units.is_dir() else 0


def kill_at_half(cmd, work: Path, total: int) -> int:
    """Start the command, SIGKILL it once half of the units are committed; the units committed then."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while proc.poll() is None and units_done(work) < total // 2:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "finished before it could be killed"
    return units_done(work)


def run_cli(cmd) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_sigkill_then_rerun_resumes_and_is_byte_identical(corpus, tokenizer_dir, tmp_path):
    out, work = tmp_path / "out", tmp_path / ".out.work"
    cmd = cli(corpus, tokenizer_dir, out)
    run_cli(cmd)  # uninterrupted, then moved aside: the resumed run below is the very same command
    ref = all_bytes(out)
    out.rename(tmp_path / "ref")
    from colossal_shear.data.records import discover_inputs
    from colossal_shear.data.sources import plan

    total = len(plan(discover_inputs([str(corpus)]), UNIT, None)[1])
    assert total >= 30
    committed = kill_at_half(cmd, work, total)
    assert total // 2 <= committed < total and not out.exists()
    proc = run_cli(cmd)
    lines = [ln for ln in proc.stderr.splitlines() if "resuming" in ln]
    assert lines == [
        f"prepare_dataset: resuming from {work}: {committed} of {total} units already done, {total - committed} left"
    ], proc.stderr
    got = all_bytes(out)
    assert got.keys() == ref.keys() and "manifest.json" in got
    assert got == ref  # parts (data, dataset_info.json, state.json) and manifest, byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ref"]  # work directory gone


def test_changed_arguments_or_inputs_are_refused_naming_them(corpus, tokenizer_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for path in corpus_files():
        (data / path.name).write_bytes(path.read_bytes() * 2)  # about 10 units
    out, work = tmp_path / "out", tmp_path / ".out.work"
    cmd = cli(data, tokenizer_dir, out)
    kill_at_half(cmd, work, 8)
    kw = dict(
        data_input_dirs=[str(data)],
        tokenizer_dir=str(tokenizer_dir),
        data_output_dirs=str(out),
        max_length=L,
        num_spliced_dataset_bins=3,
        num_proc=1,
        unit_bytes=UNIT,
        progress=False,
    )
    with pytest.raises(DataPrepError) as err:  # in this process from here on: the same check, no start-up time
        prepare_dataset(PrepareConfig(**{**kw, "max_length": 32, "seed": 5}))
    assert f"{work} holds the work of another run (max_length was 64, now 32; seed was 42, now 5)" in str(err.value)
    assert "pass --overwrite to discard it" in str(err.value)
    victim = sorted(data.iterdir())[1]
    with open(victim, "ab") as f:
        f.write(b'{"target": "one more record"}\n')
    with pytest.raises(DataPrepError, match=f"input {victim} changed \\(size"):
        prepare_dataset(PrepareConfig(**kw))
    assert units_done(work) > 0  # refused: nothing was discarded
    manifest = prepare_dataset(PrepareConfig(**kw, overwrite=True))  # discards the other run's work, starts over
    assert manifest["inputs"][0]["records"] > 0 and (out / "manifest.json").is_file() and not work.exists()


def test_shards_merged_give_the_one_host_result(corpus, tokenizer_dir, tmp_path):
    """unit i -> shard i mod 3, run one after another here (the hosts' version is test_data_prep_multihost.py);
    the command without shard flags merges, tokenising nothing."""
    kw = dict(
        data_input_dirs=[str(corpus)],
        tokenizer_dir=str(tokenizer_dir),
        max_length=L,
        num_spliced_dataset_bins=3,
        num_proc=1,
        unit_bytes=UNIT,
        progress=False,
    )
    one = prepare_dataset(PrepareConfig(data_output_dirs=str(tmp_path / "one"), **kw))
    out = tmp_path / "sharded"
    work = tmp_path / ".sharded.work"
    for shard in (2, 0):
        assert prepare_dataset(PrepareConfig(data_output_dirs=str(out), shard_index=shard, num_shards=3, **kw)) is None
    done = {int(p.name[2:9]) for p in (work / "units").glob("u-*.json")}
    assert done and all(i % 3 in (0, 2) for i in done) and not out.exists()
    with pytest.raises(DataPrepError, match="another host started a different run|holds the work of another run"):
        prepare_dataset(PrepareConfig(data_output_dirs=str(out), shard_index=1, num_shards=3, **{**kw, "seed": 1}))
    assert prepare_dataset(PrepareConfig(data_output_dirs=str(out), shard_index=1, num_shards=3, **kw)) is None
    merged = prepare_dataset(PrepareConfig(data_output_dirs=str(out), **kw))
    assert {k: v for k, v in merged.items() if k != "command"} == {k: v for k, v in one.items() if k != "command"}
    assert all_bytes(out / "arrow") == all_bytes(tmp_path / "one" / "arrow") and not work.exists()
