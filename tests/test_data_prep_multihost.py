"""Data preparation on two hosts (issue 25), for real: the same command under `colossalai run --hostfile` on two
network-namespace hosts with an sshd each, sharing the file system (tests/netns_hosts.py). Each rank takes unit i
with i mod 2 == its rank (watched with fanotify: which host wrote which unit), rank 0 waits for the other and
merges, and the result is byte-identical to the same command run on one host."""

import re
import sys

import pytest
from netns_hosts import WriteWatch
from test_data_prep import L
from test_data_prep_resume import all_bytes

from colossal_shear.bundled import corpus_files

pytestmark = pytest.mark.multihost

UNIT = 64 << 10


def test_two_hosts_give_the_one_host_result(cluster, tokenizer_dir, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in corpus_files():
        (corpus / path.name).write_bytes(path.read_bytes() * 3)
    out = tmp_path / "out"
    args = [
        "data_prep/prepare_pretrain_dataset.py",
        "--data_input_dirs",
        corpus,
        "--tokenizer_dir",
        tokenizer_dir,
        "--data_output_dirs",
        out,
        "--max_length",
        L,
        "--num_spliced_dataset_bins",
        3,
        "--num_proc",
        1,
        "--unit_bytes",
        UNIT,
        "--no_progress",
    ]
    one = cluster.run_on(cluster.hosts[0], [sys.executable, *args], timeout=300)
    assert "total" in one.stdout
    ref = all_bytes(out)
    out.rename(tmp_path / "one-host")

    watch = WriteWatch(cluster, tmp_path)
    try:
        two = cluster.run_on(
            cluster.hosts[0],
            [
                "colossalai",
                "run",
                "--nproc_per_node",
                1,
                "--hostfile",
                cluster.hostfile(),
                "--master_addr",
                "cs-node-1",
                "--master_port",
                29711,
                *args,
            ],
            env=cluster.env(),
            timeout=300,
        )
    finally:
        writes = watch.close()
    assert "shard 1 of 2 done" in two.stdout + two.stderr, two.stdout + two.stderr
    assert all_bytes(out) == ref  # parts and manifest (same command), byte for byte
    assert not (tmp_path / ".out.work").exists()

    by_unit: dict[int, set] = {}
    for path, hosts in writes.items():
        m = re.fullmatch(r"\.out\.work/units/\.u-(\d+)\.arrow\.tmp-.*", path)
        if m:
            by_unit.setdefault(int(m.group(1)), set()).update(hosts)
    assert len(by_unit) >= 10, writes
    for unit, hosts in by_unit.items():  # unit i: written once, by the host of rank i mod 2
        assert hosts == {f"cs-node-{unit % 2 + 1}"}, (unit, hosts)
