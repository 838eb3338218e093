#!/usr/bin/env python3
"""Expand and/or prune a tokenizer (SentencePiece tokenizer.model or Hugging Face byte-level tokenizer.json).

Flags of Colossal-LLaMA-2's script are kept (--source_tokenizer_dir, --target_tokenizer_dir, --expand_tokens_file);
everything else is documented in docs/vocab.md. The work is `colossal_shear.vocab.init_tokenizer`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from colossal_shear.vocab import TokenizerConfig, VocabError, init_tokenizer  # noqa: E402
from colossal_shear import cli  # noqa: E402
from colossal_shear.vocab.frequencies import default_workers  # noqa: E402


def parse_args(argv=None) -> TokenizerConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source_tokenizer_dir", type=Path, required=True,
                   help="directory with tokenizer.model (SentencePiece) or tokenizer.json (HF fast, byte-level BPE)")
    p.add_argument("--target_tokenizer_dir", type=Path, required=True, help="output directory (must not exist)")
    p.add_argument("--expand_tokens_file", type=Path,
                   help='pieces to add: JSONL, one {"piece": "..."} per line, or plain text, one piece per line')
    p.add_argument("--learn_from_corpus", type=Path, nargs="+", default=[], metavar="FILE",
                   help="train a BPE on these files and add its best pieces the source lacks")
    p.add_argument("--num_new_pieces", type=int, help="how many learned pieces to add (with --learn_from_corpus)")
    p.add_argument("--prune_corpus", type=Path, nargs="+", default=[], metavar="FILE",
                   help="keep only the pieces this corpus uses (JSONL with text or source/target, or plain text)")
    p.add_argument("--keep_top_k", type=int, help="keep the K most frequent used pieces (with --prune_corpus)")
    p.add_argument("--min_count", type=int, help="keep pieces used at least C times (with --prune_corpus)")
    p.add_argument("--eval_file", type=Path, nargs="+", default=[], metavar="FILE",
                   help="report tokens per character before/after on these files (per category if present)")
    p.add_argument("--num_workers", type=int, default=default_workers(),
                   help="processes for counting tokens (default: %(default)s)")
    p.add_argument("--no_intermediate_pieces", action="store_true",
                   help="do not add the intermediate pieces BPE needs to build a new piece (it may then never "
                        "be produced; the report counts such pieces)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing target directory")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    return TokenizerConfig(
        source_tokenizer_dir=a.source_tokenizer_dir,
        target_tokenizer_dir=a.target_tokenizer_dir,
        expand_tokens_file=a.expand_tokens_file,
        learn_from_corpus=a.learn_from_corpus,
        num_new_pieces=a.num_new_pieces,
        prune_corpus=a.prune_corpus,
        keep_top_k=a.keep_top_k,
        min_count=a.min_count,
        eval_file=a.eval_file,
        num_workers=a.num_workers,
        add_intermediates=not a.no_intermediate_pieces,
        overwrite=a.overwrite,
        progress=not a.no_progress,
    )


def main(argv=None) -> int:
    return cli.run(init_tokenizer, parse_args(argv), VocabError, lambda report: print(report.format()))


if __name__ == "__main__":
    sys.exit(main())
