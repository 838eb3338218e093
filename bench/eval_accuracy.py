#!/usr/bin/env python3
"""Downstream accuracy of the SmolLM2-135M asset (bench/assets_fetch.py: the Instruct model de-quantised from the
Q4_1 GGUF, fp32) through evaluate.py's code path (lm-eval's HFLM, its task definitions, the local validation sets),
0-shot, one task at a time with its wall time, beside lm-eval figures published for SmolLM2-135M-Instruct (REFERENCE):

    nice -n 10 python bench/eval_accuracy.py [--tasks piqa,arc_easy,...] [--limit N] [--out bench-eval.json]

Each finished task is stored in --out at once (a long run that is stopped keeps what finished; a task already there
is not run again).

--chunk N scores each task N documents at a time (its document count read from the local data) and stores each
finished piece at once, so a stopped run resumes at the next piece; when a task's last piece is in, its entry is the
pooled figures (exactly those of one run over all its documents; seconds summed). --shard i/n: this process takes
every n-th piece of each task, from the i-th, so n processes started with 0/n ... n-1/n share the work, writing the
same --out (each write holds an exclusive lock on <out>.lock; colossal_shear/eval/chunks.py):

    nice -n 10 python bench/eval_accuracy.py --tasks hellaswag,boolq --chunk 500 --shard 0/2 --out full.json &
    nice -n 10 python bench/eval_accuracy.py --tasks hellaswag,boolq --chunk 500 --shard 1/2 --out full.json &

Give every run on one --out the same --chunk (and --limit): a mismatch is a one-line error.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import assets_fetch  # noqa: E402

from colossal_shear.core.errors import ConfigError  # noqa: E402
from colossal_shear.eval import chunks  # noqa: E402
from colossal_shear.eval.benchmarks import check_tasks, num_documents  # noqa: E402
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
    p.add_argument("--chunk", type=int, default=None, help="documents per piece (default: each task in one go)")
    p.add_argument("--shard", default="0/1", help="i/n: this process's share of the pieces (with --chunk)")
    p.add_argument("--out", default="bench-eval.json")
    a = p.parse_args()
    try:
        shard = chunks.parse_shard(a.shard)
        todo = plan(a.tasks.split(","), Path(a.out), a.limit, a.chunk, shard)
    except ConfigError as e:
        p.error(str(e))
    lm = None
    for task, starts, docs in todo:
        if lm is None:
            cfg = EvalConfig(model=assets_fetch.smollm2_dir(), tasks=[task], batch_size=a.batch_size)
            lm = make_lm(*load_model(cfg), a.batch_size)
        if a.chunk is None:
            t0 = time.perf_counter()
            scores = run_tasks(lm, [task], 0, a.limit)[task]
            chunks.store_task(Path(a.out), task, {**scores, "seconds": round(time.perf_counter() - t0, 1)})
        for start in starts:
            t0 = time.perf_counter()
            docs_here = chunks.chunk_docs(start, docs, a.chunk)
            scores = run_tasks(lm, [task], 0, samples=docs_here)[task]
            scores["seconds"] = round(time.perf_counter() - t0, 1)
            if scores["n"] != len(docs_here):
                raise RuntimeError(f"{task}: lm-eval scored {scores['n']} documents from {start}, not {len(docs_here)}")
            chunks.store_chunk(Path(a.out), task, start, scores, docs, a.chunk)
            print(f"{task}: documents {start}..{docs_here[-1]} stored", flush=True)
    show(a.tasks.split(","), chunks.read_store(Path(a.out)))


def plan(tasks: list[str], out: Path, limit: int | None, chunk: int | None, shard) -> list[tuple[str, list, int]]:
    """(task, first document of each piece this process scores, the task's documents) for each task with work left."""
    check_tasks(tasks)
    todo = []
    for task in tasks:
        if chunk is None:
            entry = chunks.read_store(out).get(task)
            if entry is not None and not chunks.is_finished(entry):
                raise ConfigError(f"{out}: {task} is being scored in pieces: give --chunk {entry['chunk']}")
            if entry is None:
                todo.append((task, [], 0))
            continue
        docs = num_documents(task)
        docs = docs if limit is None else min(limit, docs)
        starts = chunks.pending(out, task, docs, chunk, shard)
        if starts:
            todo.append((task, starts, docs))
    return todo


def show(tasks: list[str], done: dict) -> None:
    print(f"{'task':<15} {'n':>6} {'acc':>7} {'acc_norm':>9} {'seconds':>8}  reference (lm-eval, original weights)")
    for task in tasks:
        s = done.get(task)
        if s is None or "chunks" in s:
            pieces = 0 if s is None else f"{len(s['chunks'])} of {len(chunks.chunk_starts(s['docs'], s['chunk']))}"
            print(f"{task:<15} unfinished: {pieces} pieces stored", flush=True)
            continue
        norm = "-" if s["acc_norm"] is None else f"{100 * s['acc_norm']:.1f}"
        ref = f"{REFERENCE[task][0]} {REFERENCE[task][1]:.1f}" if task in REFERENCE else "-"
        print(f"{task:<15} {s['n']:>6} {100 * s['acc']:>7.1f} {norm:>9} {s['seconds']:>8.1f}  {ref}", flush=True)


if __name__ == "__main__":
    main()
