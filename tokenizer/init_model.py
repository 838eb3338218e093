#!/usr/bin/env python3
"""Resize a model's input embeddings and LM head to a new tokenizer (expanded and/or pruned by init_tokenizer.py).

Flags of Colossal-LLaMA-2's script are kept (--source_model_and_tokenizer_path, --target_tokenizer_path,
--target_model_path); the rest is documented in docs/vocab.md. The work is `colossal_shear.embeddings.resize_model`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from colossal_shear.embeddings import DTYPES, MODEL_INITS, ResizeConfig, resize_model  # noqa: E402
from colossal_shear import cli  # noqa: E402
from colossal_shear.vocab import VocabError  # noqa: E402


def parse_args(argv=None) -> ResizeConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source_model_and_tokenizer_path", type=Path, required=True,
                   help="Hugging Face model directory (config.json, weights, tokenizer files)")
    p.add_argument("--target_tokenizer_path", type=Path, required=True,
                   help="the new tokenizer (its id_map.json, if any, selects the rows)")
    p.add_argument("--target_model_path", type=Path, required=True, help="output directory (must not exist)")
    p.add_argument("--init", choices=MODEL_INITS, default="subtoken_mean",
                   help="new rows: mean of the source rows of the pieces the old tokenizer splits the new piece "
                        "into (default), mean of all rows, normal with the rows' per-dimension mean/std, or "
                        "calibrated: output rows fitted to the next-token loss on --calibration_file")
    p.add_argument("--calibration_file", type=Path, nargs="+", default=[],
                   help="--init calibrated: text in the new language (JSONL records or plain text)")
    p.add_argument("--calibration_tokens", type=int, default=4096,
                   help="--init calibrated: next-token positions to fit on, spread over the files (default 4096)")
    p.add_argument("--calibration_refine_steps", type=int, default=0,
                   help="--init calibrated: then refine the new rows by a shared linear correction for up to "
                        "this many L-BFGS steps (early-stopped on held-out calibration text; default 0: off)")
    p.add_argument("--no_calibration_bias", action="store_true",
                   help="--init calibrated: skip the per-token biases fitted after the coefficients")
    p.add_argument("--untie_embeddings", action="store_true",
                   help="give a tied model its own LM head (saved untied), so that --init calibrated can fit the "
                        "output rows and choose the input rows separately")
    p.add_argument("--no_progress", action="store_true", help="no progress lines on stderr")
    p.add_argument("--pad_to_multiple_of", type=int, default=64,
                   help="pad the vocabulary dimension to a multiple of this (0 or 1: no padding; default 64)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of the saved model (default: the dtype the source weights are stored in)")
    p.add_argument("--allow_downcast", action="store_true",
                   help="allow --dtype to lose precision (e.g. float32 -> bfloat16); refused otherwise")
    p.add_argument("--seed", type=int, default=0, help="seed for --init normal")
    p.add_argument("--max_shard_size", default="5GB", help="safetensors shard size (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing target directory")
    a = p.parse_args(argv)
    return ResizeConfig(
        source_model_and_tokenizer_path=a.source_model_and_tokenizer_path,
        target_tokenizer_path=a.target_tokenizer_path,
        target_model_path=a.target_model_path,
        init=a.init,
        pad_to_multiple_of=a.pad_to_multiple_of,
        dtype=a.dtype,
        allow_downcast=a.allow_downcast,
        seed=a.seed,
        overwrite=a.overwrite,
        max_shard_size=a.max_shard_size,
        calibration_file=a.calibration_file,
        calibration_tokens=a.calibration_tokens,
        calibration_refine_steps=a.calibration_refine_steps,
        untie_embeddings=a.untie_embeddings,
        calibration_bias=not a.no_calibration_bias,
        progress=not a.no_progress,
    )


def main(argv=None) -> int:
    return cli.run(resize_model, parse_args(argv), VocabError, lambda report: print(report.format()))


if __name__ == "__main__":
    sys.exit(main())
