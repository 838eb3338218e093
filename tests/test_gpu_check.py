"""`make gpu-check` cannot rot on CPU machines: its script runs here with --dry_run (the gpu tests skip with their
reason; the throughput table is made at tiny sizes, gemini a row with the reason)."""

import os
import subprocess
import sys

from conftest import ROOT


def test_gpu_check_dry_run_prints_the_table():
    env = {**os.environ, "PY": sys.executable, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", str(ROOT / "bench/gpu_check.sh"), "--dry_run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert "gpu test: needs" in out  # the gpu tests were collected and skipped with the reason
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    for run in ("plain", "plain+compile", "zero2", "zero2+compile", "3d", "prune"):
        assert run in rows and "n/a (CPU)" in rows[run], (run, out)
    assert "skipped: Gemini" in rows["gemini"]
    assert "prune-stage step time / zero2 step time" in out


def test_gpu_check_refuses_without_a_gpu():
    env = {**os.environ, "PY": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "bench/gpu_check.sh")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2
    assert "sees no CUDA GPU" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
