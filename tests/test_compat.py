"""Each workaround in colossal_shear.compat is needed (colossalai fails without it) and sufficient (works with it)."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, _free_port

from colossal_shear.core import compat


def _probe(*flags) -> dict:
    env = {"PYTHONPATH": str(ROOT), "MASTER_PORT": str(_free_port()), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests/workers/compat_probe.py"), *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULTS ")]
    assert lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULTS ") :])


@pytest.fixture(scope="module")
def probes():
    return _probe(), _probe("--with-compat")


@pytest.mark.parametrize("name", list(compat.PATCHES))
def test_workaround_is_needed_and_works(probes, name):
    without, with_compat = probes
    assert name in without, f"no probe exercises compat patch {name}"
    assert without[name] != "ok", (
        f"colossalai no longer fails without compat patch {name!r}: the workaround can be removed"
    )
    assert with_compat[name] == "ok", f"compat patch {name!r} does not fix: {with_compat[name]}"


def test_install_is_idempotent():
    compat.install()
    assert compat.install() == []
    assert set(compat.applied()) == set(compat.PATCHES)
