"""Learning new pieces from a corpus: train a SentencePiece BPE on it and return its pieces, best first.

The trainer's piece order is BPE merge order (scores descending), which is what "best first" means for BPE: a
piece comes after the pieces it is built from. The caller keeps the first N the source tokenizer lacks; if the
trained vocabulary did not hold N new ones, one retry trains a vocabulary twice as large.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from colossal_shear.core.errors import VocabError
from colossal_shear.vocab.corpus import iter_corpus

MAX_SENTENCE_BYTES = 16384


def _write_training_text(paths: Sequence[Path], out: Path) -> tuple[int, int]:
    """Write the corpus one sentence per line; returns (lines, distinct characters)."""
    n = 0
    chars: set[str] = set()
    with open(out, "w", encoding="utf-8") as f:
        for rec in iter_corpus(paths):
            for line in rec.text.splitlines():
                if line.strip():
                    f.write(line)
                    f.write("\n")
                    chars.update(line)
                    n += 1
    return n, len(chars)


def train_bpe(text_file: Path, prefix: str | Path, vocab_size: int, **settings) -> None:
    """Train a SentencePiece BPE that keeps text as written (identity normalisation, whitespace kept, a dummy prefix
    like LLaMA's): the settings every tokenizer trained in this package shares; `settings` adds the rest."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        input=str(text_file),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        minloglevel=2,
        **settings,
    )


def train_pieces(
    paths: Sequence[Path],
    merged_pieces: int,
    split_digits: bool = True,
    num_threads: int = 1,
) -> list[str]:
    """Pieces (as text, '▁' turned back into a space) of a BPE trained on `paths`, best first. The trained
    vocabulary holds every character of the corpus (SentencePiece requires it) plus `merged_pieces` merges."""
    from sentencepiece import sentencepiece_model_pb2 as pb2

    with tempfile.TemporaryDirectory(prefix="colossal_shear_learn_") as tmp:
        text = Path(tmp) / "corpus.txt"
        lines, n_chars = _write_training_text(paths, text)
        if lines == 0:
            raise VocabError(f"--learn_from_corpus: no text in {', '.join(map(str, paths))}")
        prefix = os.path.join(tmp, "learned")
        try:
            train_bpe(
                text,
                prefix,
                n_chars + merged_pieces + 1,
                hard_vocab_limit=False,  # a small corpus yields fewer pieces instead of an error
                character_coverage=0.9995,
                split_digits=split_digits,
                byte_fallback=False,
                max_sentence_length=MAX_SENTENCE_BYTES,
                input_sentence_size=2_000_000,
                shuffle_input_sentence=True,
                num_threads=max(1, num_threads),
                bos_id=-1,
                eos_id=-1,
                unk_id=0,
            )
        except RuntimeError as e:
            raise VocabError(f"--learn_from_corpus: SentencePiece training failed: {e}") from None
        proto = pb2.ModelProto()
        proto.ParseFromString(Path(prefix + ".model").read_bytes())
    return [p.piece.replace("\u2581", " ") for p in proto.pieces if p.type == 1]
