#!/usr/bin/env python3
"""Evaluate a Hugging Face model directory (any model the recipe exports): zero/few-shot accuracy through
lm-evaluation-harness on benchmark data fetched once into the cache (no network after that), and nats per character,
tokens per character and per-token loss of text files per category.

    python evaluate.py --model outputs/demo/replay/export --tasks piqa,arc_easy --limit 200 \
        --text_eval zh.jsonl,en.jsonl --output results.json

Options: `--help` or docs/cli.md. The work is `colossal_shear.eval.run.evaluate`; see docs/evaluation.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing

from colossal_shear import cli  # noqa: E402
from colossal_shear.eval.results import format_table  # noqa: E402
from colossal_shear.eval.run import evaluate  # noqa: E402


def show(results) -> None:
    if results is not None:  # None on ranks other than 0 of a data-parallel run
        print(format_table(results))


def main(argv=None) -> int:
    return cli.run("evaluate.py", evaluate, show, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
