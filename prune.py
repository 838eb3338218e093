#!/usr/bin/env python3
"""One-shot structured pruning of a Hugging Face decoder (Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3) to a target
shape (no training).

  --method importance  Minitron activation importance on calibration data (width) + block influence (depth)
  --method depth       remove whole layers: lowest block influence, or keep exactly --keep_layers
  --method random      OpenBA-V2's random-selection baseline

The result is a plain Hugging Face directory (safetensors, config.json with the new shape, tokenizer files) that
loads with AutoModelForCausalLM.from_pretrained. Training-based pruning (hard-concrete masks held on a ramped target) is
`train.py --stage prune`. Options: `--help` or docs/cli.md. The work is `colossal_shear.pruning.oneshot.prune_oneshot`;
see docs/pruning.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing

from colossal_shear import cli  # noqa: E402
from colossal_shear.pruning.oneshot import prune_oneshot  # noqa: E402


def main(argv=None) -> int:
    return cli.run("prune.py", prune_oneshot, lambda report: print(report.format()), argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
