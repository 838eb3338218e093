#!/usr/bin/env python3
"""Resize a model's input embeddings and LM head to a new tokenizer (expanded and/or pruned by init_tokenizer.py).

Options: `--help` or docs/cli.md; details in docs/vocab.md. The work is `colossal_shear.vocab.resize.resize_model`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from colossal_shear import cli  # noqa: E402
from colossal_shear.vocab.resize import resize_model  # noqa: E402


def main(argv=None) -> int:
    return cli.run("tokenizer/init_model.py", resize_model, lambda report: print(report.format()), argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
