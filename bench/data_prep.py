"""Data-preparation throughput: colossal_shear.data.prepare_dataset vs straightforward baselines, same input, same run.

Input: the bundled corpus (en, zh, code JSONL) repeated `--repeat` times into a temporary directory. Every pipeline
reads that JSONL, tokenises with the bundled LLaMA-style SentencePiece tokenizer, packs into `--max_length`
sequences and writes Arrow; the figure is non-padding output tokens per wall-clock second (start to files on disk).

Baselines (Colossal-LLaMA-2's published approach, with its truncation fixed so every pipeline emits the same tokens):
  - `baseline-slow`: `datasets.load_dataset("json")`, `.map` one record at a time with the slow `LlamaTokenizer`
    (what the published script loads), greedy packing in Python lists, `Dataset.from_dict(...).save_to_disk`.
  - `baseline-fast`: the same with the fast tokenizer, to separate tokenizer choice from pipeline design.

    python bench/data_prep.py --repeat 10 --num_proc 2
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from colossal_shear.bundled import CATEGORIES, corpus_files, train_sentencepiece  # noqa: E402


def make_input(directory: Path, repeat: int) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    total = 0
    for path, cat in zip(corpus_files(), CATEGORIES):
        data = path.read_bytes()
        with open(directory / f"{cat}.jsonl", "wb") as f:
            for _ in range(repeat):
                f.write(data if data.endswith(b"\n") else data + b"\n")
        total += (directory / f"{cat}.jsonl").stat().st_size
    return total


def run_ours(inp: Path, tok: Path, out: Path, max_length: int, num_proc: int) -> int:
    from colossal_shear.data import PrepareConfig, prepare_dataset

    m = prepare_dataset(
        PrepareConfig(
            [str(inp)], str(tok), str(out), max_length=max_length, num_proc=num_proc, progress=False, overwrite=True
        )
    )
    return m["totals"]["tokens"]


def run_baseline(inp: Path, tok_dir: Path, out: Path, max_length: int, num_proc: int, slow: bool) -> int:
    """Colossal-LLaMA-2 style: per-record datasets.map tokenisation, then greedy packing in Python."""
    import datasets
    from transformers import AutoTokenizer, LlamaTokenizer

    tokenizer = LlamaTokenizer.from_pretrained(str(tok_dir)) if slow else AutoTokenizer.from_pretrained(str(tok_dir))
    cache = out.parent / f"{out.name}-cache"

    def tokenize(example):
        src = tokenizer.encode(example.get("source") or "", add_special_tokens=False)
        tgt = tokenizer.encode(example["target"], add_special_tokens=False)
        ids = [tokenizer.bos_token_id] + src + tgt + [tokenizer.eos_token_id]
        labels = [-100] * (1 + len(src)) + tgt + [tokenizer.eos_token_id]
        return {"input_ids": ids, "labels": labels, "category": example.get("category") or "unknown"}

    files = sorted(str(p) for p in inp.glob("*.jsonl"))
    ds = datasets.load_dataset("json", data_files=files, split="train", cache_dir=str(cache))
    ds = ds.map(tokenize, num_proc=num_proc, remove_columns=ds.column_names)
    pad = tokenizer.unk_token_id or 0
    rows = {"input_ids": [], "labels": [], "doc_lengths": [], "category": [], "num_tokens": []}
    buffers: dict[str, tuple[list, list, list]] = {}

    def emit(cat, ids, labels, lens):
        n = len(ids)
        rows["input_ids"].append(ids + [pad] * (max_length - n))
        rows["labels"].append(labels + [-100] * (max_length - n))
        rows["doc_lengths"].append(lens)
        rows["category"].append(cat)
        rows["num_tokens"].append(n)

    for ex in ds:
        cat = ex["category"]
        ids_buf, lab_buf, lens = buffers.setdefault(cat, ([], [], []))
        ids, labels = ex["input_ids"], ex["labels"]
        while ids:
            room = max_length - len(ids_buf)
            ids_buf += ids[:room]
            lab_buf += labels[:room]
            lens.append(min(room, len(ids)))
            ids, labels = ids[room:], labels[room:]
            if len(ids_buf) == max_length:
                emit(cat, list(ids_buf), list(lab_buf), list(lens))
                ids_buf.clear(), lab_buf.clear(), lens.clear()
    for cat, (ids_buf, lab_buf, lens) in buffers.items():
        if ids_buf:
            emit(cat, ids_buf, lab_buf, lens)
    datasets.Dataset.from_dict(rows).save_to_disk(str(out))
    shutil.rmtree(cache, ignore_errors=True)
    return sum(rows["num_tokens"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=10, help="copies of the bundled corpus (about 0.28 MB each)")
    p.add_argument("--max_length", type=int, default=4096)
    p.add_argument("--num_proc", type=int, default=2)
    p.add_argument("--skip_slow", action="store_true", help="leave out baseline-slow")
    p.add_argument("--trials", type=int, default=2, help="runs of each pipeline (interleaved); the best is reported")
    args = p.parse_args()

    import datasets
    import transformers

    datasets.disable_progress_bars()
    work = Path(tempfile.mkdtemp(prefix="bench-data-prep-"))
    try:
        tok = train_sentencepiece(work / "tokenizer")
        size = make_input(work / "input", args.repeat)
        runs = [
            ("colossal_shear", lambda o: run_ours(work / "input", tok, o, args.max_length, args.num_proc)),
            ("baseline-fast", lambda o: run_baseline(work / "input", tok, o, args.max_length, args.num_proc, False)),
        ]
        if not args.skip_slow:
            runs.append(
                ("baseline-slow", lambda o: run_baseline(work / "input", tok, o, args.max_length, args.num_proc, True))
            )
        best: dict[str, tuple[int, float]] = {}
        for _ in range(args.trials):
            for name, fn in runs:
                t0 = time.perf_counter()
                tokens = fn(work / f"out-{name}")
                dt = time.perf_counter() - t0
                if name not in best or dt < best[name][1]:
                    best[name] = (tokens, dt)
                shutil.rmtree(work / f"out-{name}", ignore_errors=True)
        results = [(name, *best[name]) for name, _ in runs]
        assert len({tokens for _, tokens, _ in results}) == 1, f"pipelines disagree on the token count: {results}"
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"input: bundled corpus x{args.repeat} = {size / 1e6:.2f} MB JSONL; max_length {args.max_length}; "
        f"num_proc {args.num_proc}; best of {args.trials}; {os.cpu_count()} CPUs; python {platform.python_version()}, "
        f"transformers {transformers.__version__}, datasets {datasets.__version__}"
    )
    ours = results[0][1] / results[0][2]
    print("| pipeline | tokens | seconds | tokens/s | ours / this |")
    print("|---|---:|---:|---:|---:|")
    for name, tokens, dt in results:
        rate = tokens / dt
        print(f"| {name} | {tokens:,} | {dt:.2f} | {rate:,.0f} | {ours / rate:.2f}x |")


if __name__ == "__main__":
    main()
