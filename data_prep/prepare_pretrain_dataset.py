"""CLI: records (source, target, category; JSON Lines, Parquet, datasets directories) -> packed, loss-masked,
bucketed Arrow parts + manifest.json. Rerun the same command after a crash to resume it.

    python data_prep/prepare_pretrain_dataset.py --data_input_dirs data/en,data/zh --tokenizer_dir tok/ \
        --data_output_dirs prepared/ --max_length 4096 --num_spliced_dataset_bins 10

On several hosts: the same command under `colossalai run --hostfile H --nproc_per_node 1` (or torchrun) shares
the units among the ranks and rank 0 merges; Slurm arrays pass --shard_index/--num_shards, then run the command
without them once to merge.

Options: `--help` or docs/cli.md; formats, resume, sharding, output and errors: docs/data_prep.md. The work is done
by colossal_shear.data.prepare_dataset.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from colossal_shear import cli  # noqa: E402
from colossal_shear.data import PrepareConfig, prepare_dataset  # noqa: E402


def print_summary(manifest: dict, output_dir: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{output_dir}: {len(manifest['parts'])} parts, max_length {manifest['max_length']}")
    for col in ("part", "category", "sequences", "tokens", "loss tokens", "documents"):
        t.add_column(col, justify="left" if col in ("part", "category") else "right")
    for part in manifest["parts"]:
        for cat, s in part["categories"].items():
            t.add_row(
                part["name"],
                cat,
                f"{s['sequences']:,}",
                f"{s['tokens']:,}",
                f"{s['loss_tokens']:,}",
                f"{s['documents']:,}",
            )
    tot = manifest["totals"]
    t.add_row(
        "total",
        "",
        f"{tot['sequences']:,}",
        f"{tot['tokens']:,}",
        f"{tot['loss_tokens']:,}",
        f"{tot['documents']:,}",
        style="bold",
    )
    console = Console()
    console.print(t)
    console.print(f"padding tokens: {tot['padding_tokens']:,}; skipped lines: {manifest['skipped'] or 0}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    command = "python " + shlex.join(["data_prep/prepare_pretrain_dataset.py", *argv])

    def work(cfg: PrepareConfig):
        cfg = dataclasses.replace(cfg, command=command)
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if cfg.num_shards is None and world > 1:  # ranks of colossalai run / torchrun: shard 0 merges at the end
            cfg = dataclasses.replace(
                cfg, shard_index=int(os.environ.get("RANK", "0")), num_shards=world, merge_shards=True
            )
        return prepare_dataset(cfg), cfg.data_output_dirs

    def show(result):
        if result[0] is not None:
            print_summary(*result)

    return cli.run("data_prep/prepare_pretrain_dataset.py", work, show, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
