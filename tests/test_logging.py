"""One logger for the package (colossal_shear.core.logger): no module prints, and what a job of several processes says
is shown once (rank 0), by every rank (EVERY_RANK, prefixed), once per host (EVERY_HOST), or by the process that
claimed it (HERE). Each case runs in a fresh interpreter with the launcher's variables a process of the job has."""

import ast
import os
import subprocess
import sys

import pytest
from conftest import ROOT, run_distributed

PACKAGE = ROOT / "colossal_shear"
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "COLOSSAL_SHEAR_LOG_LEVEL")
# converted on their own branches of issue #20: drop from here once merged
PENDING: set[str] = set()


def prints(path) -> list[int]:
    """Lines of `path` that call print() or builtins.print()."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Name) and f.id == "print") or (
                isinstance(f, ast.Attribute)
                and f.attr == "print"
                and isinstance(f.value, ast.Name)
                and f.value.id in ("builtins", "__builtins__")
            ):
                found.append(node.lineno)
    return found


def test_no_package_module_prints():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel == "colossal_shear/core/logger.py" or rel in PENDING:
            continue
        if lines := prints(path):
            offenders[rel] = lines
    assert not offenders, f"print() in the package (log through colossal_shear.core.logger instead): {offenders}"


def test_the_print_check_sees_print_calls(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import builtins\nprint('a')\nbuiltins.print('b')\nx = 'print(c)'\nlog.info('print')\n")
    assert prints(probe) == [2, 3]


def run_as(env: dict, code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter that is one process of a job described by `env` (none: a plain `python`)."""
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**base, "PYTHONPATH": str(ROOT), **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


LOG_ALL = """
from colossal_shear.core.logger import EVERY_HOST, EVERY_RANK, HERE, get_logger
log = get_logger("probe")
log.info("info line")
log.warning("warning line")
log.info("mine", extra=EVERY_RANK)
log.error("my failure", extra=EVERY_RANK)
log.info("host line", extra=EVERY_HOST)
log.error("claimed line", extra=HERE)
"""


@pytest.mark.parametrize(
    "env, stdout, stderr",
    [
        ({}, "info line\nmine\nhost line\n", "warning line\nmy failure\nclaimed line\n"),
        (
            {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"},
            "info line\n[rank 0] mine\nhost line\n",
            "warning line\n[rank 0] my failure\nclaimed line\n",
        ),
        (
            {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"},
            "[rank 1] mine\n",
            "[rank 1] my failure\nclaimed line\n",
        ),
        (  # the first process of a second host
            {"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "4"},
            "[rank 2] mine\nhost line\n",
            "[rank 2] my failure\nclaimed line\n",
        ),
        ({"COLOSSAL_SHEAR_LOG_LEVEL": "WARNING"}, "", "warning line\nmy failure\nclaimed line\n"),
    ],
    ids=["one-process", "rank0", "rank1", "rank2-second-host", "level-warning"],
)
def test_what_each_rank_shows(env, stdout, stderr):
    proc = run_as(env, LOG_ALL)
    assert (proc.stdout, proc.stderr) == (stdout, stderr)


def test_lines_written_while_a_progress_bar_is_on_screen_stay_whole():
    code = (
        "import sys\nfrom tqdm import tqdm\nfrom colossal_shear.core.logger import get_logger\n"
        "bar = tqdm(total=3, file=sys.stderr)\nbar.update(1)\nget_logger('probe').info('step 1 | loss 2')\n"
        "get_logger('probe').warning('careful')\nbar.close()\n"
    )
    proc = run_as({}, code)
    assert proc.stdout == "step 1 | loss 2\n"
    assert "careful\n" in proc.stderr


REPORT = """
from colossal_shear import cli
from colossal_shear.core.errors import UserError

class Local(UserError):
    rank_local = True

def claimed(text, here):
    e = UserError(text)
    e.report_here = here
    return e

cli.report("train.py", UserError("everyone met this"))
cli.report("train.py", Local("only I met this"))
cli.report("train.py", claimed("I claimed this", True))
cli.report("train.py", claimed("another rank claimed this", False))
"""


@pytest.mark.parametrize(
    "rank, stderr",
    [
        (
            "0",
            "train.py: error: everyone met this\ntrain.py: error: [rank 0] only I met this\n"
            "train.py: error: I claimed this\n",
        ),
        ("1", "train.py: error: [rank 1] only I met this\ntrain.py: error: I claimed this\n"),
    ],
)
def test_user_errors_are_reported_once_per_job(rank, stderr):
    proc = run_as({"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": "2"}, REPORT)
    assert (proc.stdout, proc.stderr) == ("", stderr)


def test_an_unknown_flag_in_a_two_process_run_is_printed_once(tmp_path):
    with pytest.raises(AssertionError) as err:
        run_distributed(ROOT / "train.py", "--bogus_flag", "--pretrained", tmp_path, "--dataset", tmp_path)
    log = str(err.value)
    assert log.count("train.py: error: unrecognized arguments: --bogus_flag") == 1, log
    assert log.count("usage: train.py") == 1, log
