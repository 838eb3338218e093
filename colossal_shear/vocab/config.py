"""The vocabulary CLIs' options: `TokenizerConfig` (tokenizer/init_tokenizer.py) and `ResizeConfig`
(tokenizer/init_model.py). Light on purpose (no torch): the scripts' spawned worker processes import it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from colossal_shear.core.config import option
from colossal_shear.core.constants import DTYPE_NAMES
from colossal_shear.core.errors import VocabError
from colossal_shear.vocab.frequencies import default_workers

# how init_model.py fills the new rows (colossal_shear.vocab.resize); calibrated: colossal_shear.vocab.calibration
INITS = ("subtoken_mean", "mean", "normal")
MODEL_INITS = INITS + ("calibrated",)


@dataclass
class TokenizerConfig:
    """Expand and/or prune a tokenizer (SentencePiece tokenizer.model or Hugging Face byte-level tokenizer.json).
    Flag names of Colossal-LLaMA-2's script are kept."""

    source_tokenizer_dir: Path = option(
        help="directory with tokenizer.model (SentencePiece) or tokenizer.json (HF fast, byte-level BPE)"
    )
    target_tokenizer_dir: Path = option(help="output directory (must not exist unless --overwrite)")
    expand_tokens_file: Path | None = option(
        None, 'pieces to add: JSONL, one {"piece": "..."} per line, or plain text, one piece per line'
    )
    learn_from_corpus: list[Path] = option(
        help="train a BPE on these files and add its best pieces the source lacks", default_factory=list, metavar="FILE"
    )
    num_new_pieces: int | None = option(None, "how many learned pieces to add (with --learn_from_corpus)")
    prune_corpus: list[Path] = option(
        help="keep only the pieces this corpus uses (JSONL records or plain text)", default_factory=list, metavar="FILE"
    )
    keep_top_k: int | None = option(None, "keep the K most frequent used pieces (with --prune_corpus)")
    min_count: int | None = option(None, "keep pieces used at least C times (with --prune_corpus)")
    eval_file: list[Path] = option(
        help="report tokens per character before/after on these files (per category if present)",
        default_factory=list,
        metavar="FILE",
    )
    num_workers: int = option(
        help="processes for counting tokens",
        default_factory=default_workers,
        default_text="the machine's cores, at most 8",
    )
    add_intermediates: bool = option(
        True,
        "add the intermediate pieces BPE needs to build a new piece (without them "
        "it may never be produced; the report counts such pieces)",
        negative="--no_intermediate_pieces",
    )
    overwrite: bool = option(False, "replace an existing target directory")
    progress: bool = option(True, "progress bars on stderr")

    def validate(self) -> None:
        if not (self.expand_tokens_file or self.learn_from_corpus or self.prune_corpus):
            raise VocabError("nothing to do: give --expand_tokens_file, --learn_from_corpus or --prune_corpus")
        if self.learn_from_corpus and not self.num_new_pieces:
            raise VocabError("--learn_from_corpus needs --num_new_pieces N (N > 0)")
        if self.num_new_pieces is not None and not self.learn_from_corpus:
            raise VocabError("--num_new_pieces needs --learn_from_corpus FILES")
        if self.num_new_pieces is not None and self.num_new_pieces <= 0:
            raise VocabError("--num_new_pieces must be positive")
        if (self.keep_top_k is not None or self.min_count is not None) and not self.prune_corpus:
            raise VocabError("--keep_top_k / --min_count need --prune_corpus FILES")
        if self.keep_top_k is not None and self.keep_top_k <= 0:
            raise VocabError("--keep_top_k must be positive")
        if self.min_count is not None and self.min_count <= 0:
            raise VocabError("--min_count must be positive")
        if self.num_workers < 1:
            raise VocabError("--num_workers must be at least 1")


class ResizeError(VocabError):
    """A user-facing error of init_model.py."""


@dataclass
class ResizeConfig:
    """Resize a model's input embeddings and LM head to a new tokenizer (expanded and/or pruned by
    init_tokenizer.py). Flag names of Colossal-LLaMA-2's script are kept."""

    source_model_and_tokenizer_path: Path = option(
        help="Hugging Face model directory (config.json, weights, tokenizer files)"
    )
    target_tokenizer_path: Path = option(help="the new tokenizer (its id_map.json, if any, selects the rows)")
    target_model_path: Path = option(help="output directory (must not exist unless --overwrite)")
    init: str = option(
        "subtoken_mean",
        "new rows: mean of the source rows of the pieces the old tokenizer splits "
        "the new piece into, mean of all rows, normal with the rows' per-dimension mean/std, or "
        "calibrated: LM-head rows fitted to the next-token loss on --calibration_file (docs/vocab.md)",
        choices=MODEL_INITS,
    )
    pad_to_multiple_of: int = option(64, "pad the vocabulary dimension to a multiple of this (0 or 1: no padding)")
    dtype: str | None = option(
        None,
        "dtype of the saved model",
        choices=sorted(DTYPE_NAMES),
        default_text="the dtype the source weights are stored in",
    )
    allow_downcast: bool = option(
        False, "allow --dtype to lose precision (e.g. float32 -> bfloat16); refused otherwise"
    )
    seed: int = option(0, "seed for --init normal")
    overwrite: bool = option(False, "replace an existing target directory")
    max_shard_size: str = option("5GB", "safetensors shard size")
    calibration_file: list[Path] = option(
        help="--init calibrated: text in the new language (JSONL records or plain text)",
        default_factory=list,
        metavar="FILE",
    )
    calibration_tokens: int = option(4096, "--init calibrated: next-token positions to fit on, spread over the files")
    calibration_refine_steps: int = option(
        0,
        "--init calibrated: then refine the new rows by a shared linear "
        "correction for up to this many L-BFGS steps (early-stopped on held-out "
        "calibration text; 0: off)",
    )
    calibration_bias: bool = option(True, "--init calibrated: fit a per-token bias after the coefficients")
    untie_embeddings: bool = option(
        False,
        "give a tied model its own LM head (saved untied), so that --init "
        "calibrated can fit the output rows and choose the input rows separately",
    )
    progress: bool = option(True, "progress lines on stderr")

    def validate(self) -> None:
        if self.init not in MODEL_INITS:
            raise ResizeError(f"--init must be one of {', '.join(MODEL_INITS)}, got {self.init!r}")
        if self.calibration_file and self.init != "calibrated":
            raise ResizeError("--calibration_file is only used by --init calibrated")
        if self.init == "calibrated":
            self.calibration().validate()
        if self.pad_to_multiple_of < 0:
            raise ResizeError("--pad_to_multiple_of must be >= 0 (0 or 1: no padding)")
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise ResizeError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")

    def calibration(self):
        from colossal_shear.vocab.calibration import CalibrationConfig, stderr_progress

        return CalibrationConfig(
            files=[Path(f) for f in self.calibration_file],
            tokens=self.calibration_tokens,
            refine_steps=self.calibration_refine_steps,
            bias=self.calibration_bias,
            progress=stderr_progress if self.progress else None,
        )
