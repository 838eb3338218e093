"""Resumable and sharded data preparation (issue 25): SIGKILL at about half, the same command resumes with the units
left and the result is byte-identical to an uninterrupted run; changed arguments or inputs are refused, naming what
changed; shards (unit i -> shard i mod N) merged by one run give the one-run result.

The CLI runs as a real subprocess and is killed with SIGKILL (no cleanup of any kind runs)."""

import json
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


@pytest.fixture(scope="module")
def two_workers(corpus, tokenizer_dir, tmp_path_factory):
    """The command's arguments with 2 tokenisation processes, its uninterrupted result and its number of units."""
    from colossal_shear.data.records import discover_inputs
    from colossal_shear.data.sources import plan

    out = tmp_path_factory.mktemp("sig") / "out"
    run_cli(cli(corpus, tokenizer_dir, out, "--num_proc", 2))
    return (corpus, tokenizer_dir), result(out), len(plan(discover_inputs([str(corpus)]), UNIT, None)[1])


def result(out: Path):
    """What does not depend on the output's path: the parts' bytes and the manifest without the command."""
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.pop("command")
    return all_bytes(out / "arrow"), manifest


def interrupt(cmd, work: Path, units: int, sig: int, group: bool) -> str:
    """Start the command, send `sig` (to the process, or to its whole process group as Ctrl-C does) once `units`
    units are complete and pass 1 is packing; return its stderr."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        while proc.poll() is None and not (units_done(work) >= units and (work / "build" / ".spill").is_dir()):
            time.sleep(0.005)
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        err = proc.communicate(timeout=60)[1].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, err
    return err


def test_a_signal_mid_run_keeps_only_complete_units_and_the_rerun_resumes(two_workers, tmp_path):
    """SIGTERM to the main process (what `kill` and a scheduler send; its workers used to die with BrokenPipe
    tracebacks and the build directory stayed), then SIGINT to the whole process group of the resumed run (Ctrl-C):
    each time one line, exit 128 + the signal, nothing left but the complete units; the same command then resumes
    and gives the uninterrupted run's result."""
    (corpus, tok), ref, total = two_workers
    out, work = tmp_path / "out", tmp_path / ".out.work"
    cmd = cli(corpus, tok, out, "--num_proc", 2)
    for sig, group, at in ((signal.SIGTERM, False, 3), (signal.SIGINT, True, total // 2)):
        err = interrupt(cmd, work, at, sig, group)
        done = units_done(work)
        assert at <= done < total and not out.exists()
        lines = err.splitlines()
        head = f"prepare_pretrain_dataset.py: interrupted by {signal.Signals(sig).name}: the {done} of {total} units"
        assert lines[-1].startswith(f"{head} done are kept in {work} ("), err
        assert lines[-1].endswith("): rerun the same command to resume, or remove that directory"), err
        assert len(lines) == (1 if sig == signal.SIGTERM else 2), err  # the second run says it resumes first
        assert sorted(p.name for p in work.iterdir()) == ["state.json", "units"]  # no build directory
        units = sorted(p.name for p in (work / "units").iterdir())
        assert units == sorted(f"u-{i:07d}.{x}" for i in work_done(work) for x in ("arrow", "json")), units
    proc = run_cli(cmd)
    assert f"resuming from {work}: {done} of {total} units already done" in proc.stderr
    assert result(out) == ref and not work.exists()


def work_done(work: Path) -> list[int]:
    return [int(p.name[2:9]) for p in (work / "units").glob("u-*.json")]
