"""CLI: JSONL (source, target, category) -> packed, loss-masked, bucketed Arrow parts + manifest.json.

    python data_prep/prepare_pretrain_dataset.py --data_input_dirs data/en,data/zh --tokenizer_dir tok/ \
        --data_output_dirs prepared/ --max_length 4096 --num_spliced_dataset_bins 10

Flags, output format and error behaviour: docs/data_prep.md. The work is done by colossal_shear.data.prepare_dataset.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from colossal_shear.data import DataPrepError, PrepareConfig, default_num_proc, prepare_dataset  # noqa: E402
from colossal_shear import cli  # noqa: E402
from colossal_shear.data.config import split_paths  # noqa: E402


def parse_args(argv=None) -> PrepareConfig:
    d = PrepareConfig.__dataclass_fields__
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_input_dirs", required=True, type=split_paths,
                   help="comma-separated directories of .jsonl/.jsonl.gz files (not recursive) and/or single files")
    p.add_argument("--tokenizer_dir", required=True, help="Hugging Face tokenizer directory (must define EOS)")
    p.add_argument("--data_output_dirs", required=True, help="output directory (arrow/part-XXXXX, manifest.json)")
    p.add_argument("--max_length", type=int, default=d["max_length"].default, help="tokens per packed sequence")
    p.add_argument("--num_spliced_dataset_bins", type=int, default=d["num_spliced_dataset_bins"].default,
                   help="bins per category; part k holds bin k of every category")
    p.add_argument("--num_proc", type=int, default=default_num_proc(), help="tokenisation processes")
    p.add_argument("--seed", type=int, default=d["seed"].default, help="seed of the bin assignment and shuffles")
    p.add_argument("--write_jsonl", action="store_true", help="also write jsonl/part-XXXXX.jsonl")
    p.add_argument("--skip_invalid", action="store_true",
                   help="skip bad lines and count them per reason in the manifest instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")
    p.add_argument("--buffer_size", type=int, default=d["buffer_size"].default,
                   help="packed sequences held in memory before spilling to disk")
    p.add_argument("--batch_lines", type=int, default=d["batch_lines"].default, help="input lines per tokenisation task")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return PrepareConfig(
            data_input_dirs=a.data_input_dirs, tokenizer_dir=a.tokenizer_dir, data_output_dirs=a.data_output_dirs,
            max_length=a.max_length, num_spliced_dataset_bins=a.num_spliced_dataset_bins, num_proc=a.num_proc,
            seed=a.seed, write_jsonl=a.write_jsonl, skip_invalid=a.skip_invalid, overwrite=a.overwrite,
            buffer_size=a.buffer_size, batch_lines=a.batch_lines, progress=not a.no_progress,
            command="python " + shlex.join(["data_prep/prepare_pretrain_dataset.py", *argv]))
    except ValueError as e:
        p.error(str(e))


def print_summary(manifest: dict, output_dir: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{output_dir}: {len(manifest['parts'])} parts, max_length {manifest['max_length']}")
    for col in ("part", "category", "sequences", "tokens", "loss tokens", "documents"):
        t.add_column(col, justify="left" if col in ("part", "category") else "right")
    for part in manifest["parts"]:
        for cat, s in part["categories"].items():
            t.add_row(part["name"], cat, f"{s['sequences']:,}", f"{s['tokens']:,}", f"{s['loss_tokens']:,}",
                      f"{s['documents']:,}")
    tot = manifest["totals"]
    t.add_row("total", "", f"{tot['sequences']:,}", f"{tot['tokens']:,}", f"{tot['loss_tokens']:,}",
              f"{tot['documents']:,}", style="bold")
    console = Console()
    console.print(t)
    console.print(f"padding tokens: {tot['padding_tokens']:,}; skipped lines: {manifest['skipped'] or 0}")


def main(argv=None) -> int:
    config = parse_args(argv)
    return cli.run(prepare_dataset, config, DataPrepError,
                   lambda manifest: print_summary(manifest, config.data_output_dirs))


if __name__ == "__main__":
    sys.exit(main())
