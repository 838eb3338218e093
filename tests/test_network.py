"""The interface gloo/NCCL bind to (colossal_shear.train.network), without the multi-host harness: a loopback master
means `lo`, and a master that does not resolve or has no route stops train.py with one line. Lookups that could go
to a name server run in an empty network namespace, so nothing leaves the machine."""

import json
import subprocess
import sys
from datetime import timedelta

import pytest
from conftest import ROOT
from netns_hosts import Unavailable, empty_netns

from colossal_shear.bundled import corpus_files
from colossal_shear.data import PrepareConfig, prepare_dataset
from colossal_shear.train.distributed import network


@pytest.fixture(scope="module")
def isolated():
    try:
        return empty_netns()
    except Unavailable as e:
        pytest.skip(str(e))


def test_loopback_master_uses_lo():
    """One node, or several "nodes" that all name the master by a loopback address: they are all this machine."""
    for addr in ("127.0.0.1", "localhost"):
        for multi_node in (False, True):
            choice = network.choose_interface(addr, 29500, multi_node=multi_node)
            assert (choice.ifname, choice.address) == ("lo", "127.0.0.1"), choice


def test_configure_sets_what_is_unset_and_says_so():
    """Which process shows the line (each host's local rank 0) is the logger's: tests/test_logging.py."""
    base = {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    lines = []
    env = {**base, "LOCAL_RANK": "0"}
    assert network.configure(env, log=lines.append).ifname == "lo"
    assert (env["GLOO_SOCKET_IFNAME"], env["NCCL_SOCKET_IFNAME"]) == ("lo", "lo")
    assert len(lines) == 1 and "uses lo (127.0.0.1)" in lines[0] and "GLOO_SOCKET_IFNAME" in lines[0]

    env = {**base, "LOCAL_RANK": "1", "GLOO_SOCKET_IFNAME": "eth7"}
    network.configure(env, log=lines.append)
    assert (env["GLOO_SOCKET_IFNAME"], env["NCCL_SOCKET_IFNAME"]) == ("eth7", "lo")  # a given name is kept
    assert len(lines) == 2 and "GLOO_SOCKET_IFNAME=eth7 (given)" in lines[1]

    for off in (
        {"COLOSSAL_SHEAR_AUTO_IFNAME": "0"},
        {"WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"},
        {"GLOO_SOCKET_IFNAME": "a", "NCCL_SOCKET_IFNAME": "b"},
    ):
        env = {**base, "LOCAL_RANK": "0", **off}
        assert network.configure(env, log=lines.append) is None
        assert env.get("GLOO_SOCKET_IFNAME") == off.get("GLOO_SOCKET_IFNAME")
    assert len(lines) == 2


def test_dist_timeout():
    assert network.dist_timeout({}) is None
    assert network.dist_timeout({network.TIMEOUT_VAR: "90"}) == timedelta(seconds=90)
    for bad in ("0", "-3", "soon"):
        with pytest.raises(network.NetworkError, match=f"{network.TIMEOUT_VAR}='{bad}' is not a positive number"):
            network.dist_timeout({network.TIMEOUT_VAR: bad})


PROBE = """
import json, sys
from colossal_shear.train.distributed import network
out = {}
for host in sys.argv[1:]:
    try:
        out[host] = repr(network.choose_interface(host, 29500, multi_node=True))
    except network.NetworkError as e:
        out[host] = "NetworkError: " + str(e)
print(json.dumps(out))
"""


def test_unresolvable_or_unreachable_master_is_a_clear_error(isolated):
    proc = subprocess.run(
        [*isolated, sys.executable, "-c", PROBE, "cs-no-such-host.invalid", "10.231.9.9"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={"PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["cs-no-such-host.invalid"].startswith(
        "NetworkError: MASTER_ADDR 'cs-no-such-host.invalid' does not resolve on host"
    ), out
    assert out["10.231.9.9"].startswith(
        "NetworkError: MASTER_ADDR '10.231.9.9' (10.231.9.9: Network is unreachable) is unreachable from host"
    ), out


@pytest.fixture(scope="module")
def dataset(tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("net-data") / "prepared"
    prepare_dataset(
        PrepareConfig(
            data_input_dirs=[str(corpus_files()[0])],
            tokenizer_dir=str(tokenizer_dir),
            data_output_dirs=str(out),
            max_length=64,
            num_spliced_dataset_bins=1,
            num_proc=1,
            progress=False,
        )
    )
    return out


def test_train_stops_with_one_line_when_master_addr_does_not_resolve(isolated, model_dir, dataset):
    """A launcher that sets the torch variables itself (no torchrun rendezvous to fail first): exit 2, one line."""
    env = {
        "PYTHONPATH": str(ROOT),
        "PATH": "/usr/bin:/bin",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "cs-no-such-host.invalid",
        "MASTER_PORT": "29500",
    }
    proc = subprocess.run(
        [
            *isolated,
            sys.executable,
            str(ROOT / "train.py"),
            "--pretrained",
            str(model_dir),
            "--dataset",
            str(dataset),
            "--plugin",
            "ddp",
            "--mixed_precision",
            "fp32",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1 and "MASTER_ADDR 'cs-no-such-host.invalid' does not resolve" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
