"""The embedded default: a bundled multilingual corpus, a LLaMA-style SentencePiece tokenizer trained on it, and a
tiny `LlamaForCausalLM` (grouped-query attention) built for it.

Everything here is real (a real SentencePiece BPE model with byte fallback, real Hugging Face directories) and
small enough to build in a couple of seconds, so the tests, the demo and the benchmarks share one source of truth.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from colossal_shear.core.fsutil import atomic_dir

CORPUS_DIR = Path(__file__).parent / "assets" / "corpus"
CATEGORIES = ("en", "zh", "code")


def corpus_files() -> list[Path]:
    return [CORPUS_DIR / f"{c}.jsonl" for c in CATEGORIES]


def corpus_records() -> Iterator[dict]:
    """The bundled records as raw JSON objects (for tests that build their own inputs from them)."""
    for path in corpus_files():
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


def corpus_texts() -> Iterator[str]:
    """The texts of the bundled corpus, read like every corpus (`colossal_shear.data.records`: source + target)."""
    from colossal_shear.data.records import texts

    return texts(corpus_files())


@dataclass(frozen=True)
class TinyLlamaShape:
    """Shape of the bundled model: GQA (4 query heads share 2 KV heads), untied by default."""

    hidden_size: int = 64
    intermediate_size: int = 192
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512


def train_sentencepiece(out_dir: str | os.PathLike, vocab_size: int = 2048, texts=None) -> Path:
    """Train a LLaMA-2-style BPE SentencePiece model (byte fallback, <unk>=0, <s>=1, </s>=2, digits split,
    identity normalisation) and save it as a Hugging Face tokenizer directory (slow + fast files)."""
    out = Path(out_dir)
    if (out / "tokenizer.model").exists():
        return out
    with atomic_dir(out, keep_existing=True) as tmp:  # another process that built it first wins
        _train_into(tmp, vocab_size, texts)
    return out


def _train_into(tmp: Path, vocab_size: int, texts) -> None:
    from transformers import AutoTokenizer, LlamaTokenizer

    from colossal_shear.vocab.learn import train_bpe

    lines = []
    for t in texts if texts is not None else corpus_texts():
        lines.extend(l for l in t.splitlines() if l.strip())
    with open(tmp / "train.txt", "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    train_bpe(
        tmp / "train.txt",
        tmp / "tokenizer",
        vocab_size,
        byte_fallback=True,
        character_coverage=0.99,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
    )
    (tmp / "train.txt").unlink()
    (tmp / "tokenizer.vocab").unlink()
    slow = LlamaTokenizer(vocab_file=str(tmp / "tokenizer.model"), legacy=True, add_bos_token=True)
    slow.save_pretrained(tmp)
    fast = AutoTokenizer.from_pretrained(tmp)  # converts from the .model, then writes tokenizer.json too
    fast.save_pretrained(tmp)


def build_tiny_llama(
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    tie_word_embeddings: bool = False,
    shape: TinyLlamaShape = TinyLlamaShape(),
    seed: int = 0,
) -> Path:
    """Save a randomly initialised tiny `LlamaForCausalLM` (fp32, safetensors) with its tokenizer copied beside it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=tie_word_embeddings,
        rms_norm_eps=1e-5,
        torch_dtype="float32",
        **asdict(shape),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with atomic_dir(out, keep_existing=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out


# Tiny random models of every supported family, with what sets each apart switched on (biases, q/k norms, sandwich
# norms, fused projections, explicit head_dim, rope scaling, logit soft-capping) and every norm weight and bias moved
# off its default, so that a dropped weight or a changed formula shows in the logits.
FAMILY_CONFIGS: dict[str, dict] = {
    "llama": dict(model_type="llama"),
    "llama3": dict(
        model_type="llama",
        head_dim=24,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "mistral": dict(model_type="mistral", head_dim=16, sliding_window=512),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", head_dim=24),
    "gemma": dict(model_type="gemma", head_dim=16, tie_word_embeddings=True),
    "gemma2": dict(
        model_type="gemma2",
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=512,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
        tie_word_embeddings=True,
    ),
    "gemma3_text": dict(
        model_type="gemma3_text",
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=512,
        sliding_window_pattern=2,
        tie_word_embeddings=True,
    ),
    "phi3": dict(model_type="phi3"),
}


def build_tiny_family(
    family: str,
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    shape: TinyLlamaShape = TinyLlamaShape(),
    seed: int = 0,
    **overrides,
) -> Path:
    """Save a tiny random model of `family` (a key of FAMILY_CONFIGS; fp32, safetensors) with its tokenizer."""
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    fields = {**FAMILY_CONFIGS[family], **overrides}
    config = CONFIG_MAPPING[fields.pop("model_type")](
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=None,
        torch_dtype="float32",
        **{"vocab_size": len(tok), **asdict(shape), "tie_word_embeddings": False, **fields},
    )
    if family == "qwen2":
        config.use_sliding_window = False
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms and biases off their defaults (1 or 0)
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.2 * torch.randn_like(p))
    with atomic_dir(out, keep_existing=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out


def build_bundled(root: str | os.PathLike) -> dict[str, Path]:
    """Build (or reuse) the bundled tokenizer and both tiny models under `root`."""
    root = Path(root)
    tok = train_sentencepiece(root / "tokenizer")
    return {
        "tokenizer": tok,
        "model": build_tiny_llama(root / "tiny-llama", tok),
        "model_tied": build_tiny_llama(root / "tiny-llama-tied", tok, tie_word_embeddings=True),
    }


if __name__ == "__main__":
    import sys

    from colossal_shear.core.logger import get_logger

    if len(sys.argv) != 2:
        sys.exit("usage: python -m colossal_shear.bundled OUTPUT_DIR   (builds the bundled tokenizer and tiny models)")
    for name, path in build_bundled(sys.argv[1]).items():
        get_logger(__name__).info(f"{name}: {path}")
