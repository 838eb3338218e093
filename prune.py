#!/usr/bin/env python3
"""One-shot structured pruning of a LLaMA-style Hugging Face model to a target shape (no training).

  --method importance  Minitron activation importance on calibration data (width) + block influence (depth)
  --method depth       remove whole layers: lowest block influence, or keep exactly --keep_layers
  --method random      OpenBA-V2's random-selection baseline

The result is a plain Hugging Face directory (safetensors, config.json with the new shape, tokenizer files) that
loads with AutoModelForCausalLM.from_pretrained. Training-based pruning (hard-concrete masks + Lagrangian) is
`train.py --stage prune`. The work is `colossal_shear.pruning.oneshot.prune_oneshot`; see docs/pruning.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing

from colossal_shear.pruning.oneshot import DTYPES, METHODS, OneShotConfig, prune_oneshot  # noqa: E402
from colossal_shear import cli  # noqa: E402


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None


def parse_args(argv=None) -> OneShotConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=METHODS, required=True, help="how to choose what to keep")
    p.add_argument("--pretrained", type=Path, required=True, help="source Hugging Face model directory")
    p.add_argument("--target_shape", default=None,
                   help="'hidden,heads,layers,intermediate[,kv_heads]' or a config.json / model directory with the "
                        "target's sizes (optional for --method depth with --keep_layers)")
    p.add_argument("--output_dir", type=Path, required=True, help="where to write the pruned model")
    p.add_argument("--calibration_dataset", type=Path, default=None,
                   help="JSONL of {'text'} or {'source','target'} records, or a data_prep output directory "
                        "(default: the bundled corpus)")
    p.add_argument("--num_calibration_samples", type=int, default=512, help="calibration sequences (default 512)")
    p.add_argument("--calibration_length", type=int, default=512, help="tokens per calibration sequence (default 512)")
    p.add_argument("--calibration_batch_size", type=int, default=8, help="sequences per forward (default 8)")
    p.add_argument("--keep_layers", type=_layers, default=None,
                   help="--method depth: comma-separated indices of the layers to keep (e.g. 0,1,5)")
    p.add_argument("--seed", type=int, default=0, help="seed of --method random (default 0)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="load, score and save in this dtype (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="torch device for calibration (default: cuda if available)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    a = p.parse_args(argv)
    return OneShotConfig(
        method=a.method,
        pretrained=a.pretrained,
        output_dir=a.output_dir,
        target_shape=a.target_shape,
        calibration_dataset=a.calibration_dataset,
        num_calibration_samples=a.num_calibration_samples,
        calibration_length=a.calibration_length,
        calibration_batch_size=a.calibration_batch_size,
        keep_layers=a.keep_layers,
        seed=a.seed,
        overwrite=a.overwrite,
        dtype=a.dtype,
        device=a.device,
    )


def main(argv=None) -> int:
    # user errors: bad shape, missing / existing paths, bad data
    return cli.run(prune_oneshot, parse_args(argv), (ValueError, OSError), lambda report: print(report.format()))


if __name__ == "__main__":
    sys.exit(main())
