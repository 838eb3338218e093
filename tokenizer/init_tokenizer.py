#!/usr/bin/env python3
"""Expand and/or prune a tokenizer (SentencePiece tokenizer.model or Hugging Face byte-level tokenizer.json).

Options: `--help` or docs/cli.md; details in docs/vocab.md. The work is `colossal_shear.vocab.init_tokenizer`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from colossal_shear import cli  # noqa: E402
from colossal_shear.vocab import init_tokenizer  # noqa: E402


def main(argv=None) -> int:
    return cli.run("tokenizer/init_tokenizer.py", init_tokenizer, lambda report: print(report.format()), argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
