#!/usr/bin/env python3
"""Downstream accuracy of the SmolLM2-135M asset (bench/assets_fetch.py: the Instruct model de-quantised from the
Q4_1 GGUF, fp32) through evaluate.py's code path (lm-eval's HFLM, its task definitions, the local validation sets),
one task at a time with its wall time, beside lm-eval figures published for SmolLM2-135M-Instruct (REFERENCE):

    nice -n 10 python bench/eval_accuracy.py [--tasks piqa,arc_easy,...] [--limit N] [--out bench-eval.json]

Each finished task is appended to --out at once (a long run that is stopped keeps what finished).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import assets_fetch  # noqa: E402

from colossal_shear.eval.config import EvalConfig  # noqa: E402
from colossal_shear.eval.harness import make_lm, run_tasks  # noqa: E402
from colossal_shear.eval.run import load_model  # noqa: E402

TASKS = "arc_easy,arc_challenge,piqa,winogrande,sciq,boolq,hellaswag"
# SmolLM2-135M-Instruct (the original bf16 weights, not de-quantised) under lm-eval, 0-shot, as a third party
# published them ("Baseline" column of https://hface.pages.dev/lldois/SmolLM2-135M-Reasoning-SLERP-Champion, a mirror
# of the Hugging Face model card): (metric, value in %)
REFERENCE = {
    "arc_challenge": ("acc_norm", 27.73),
    "arc_easy": ("acc", 54.12),
    "hellaswag": ("acc_norm", 42.99),
    "piqa": ("acc_norm", 66.92),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--out", default="bench-eval.json")
    a = p.parse_args()
    model_dir = assets_fetch.smollm2_dir()
    cfg = EvalConfig(model=model_dir, tasks=a.tasks.split(","), limit=a.limit, batch_size=a.batch_size)
    model, tokenizer = load_model(cfg)
    lm = make_lm(model, tokenizer, a.batch_size)
    done = json.loads(Path(a.out).read_text()) if Path(a.out).is_file() else {}
    print(f"{'task':<15} {'n':>6} {'acc':>7} {'acc_norm':>9} {'seconds':>8}  reference (lm-eval, original weights)")
    for task in cfg.tasks:
        if task not in done:
            t0 = time.perf_counter()
            scores = run_tasks(lm, [task], 0, a.limit)[task]
            done[task] = {**scores, "seconds": round(time.perf_counter() - t0, 1)}
            Path(a.out).write_text(json.dumps(done, indent=2) + "\n")
        s = done[task]
        norm = "-" if s["acc_norm"] is None else f"{100 * s['acc_norm']:.1f}"
        ref = f"{REFERENCE[task][0]} {REFERENCE[task][1]:.1f}" if task in REFERENCE else "-"
        print(f"{task:<15} {s['n']:>6} {100 * s['acc']:>7.1f} {norm:>9} {s['seconds']:>8.1f}  {ref}", flush=True)


if __name__ == "__main__":
    main()
