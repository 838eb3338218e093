"""Data preparation on a generated corpus as Parquet and as zstd JSONL: time, peak RSS, the ratio to a
tokenise-only floor and to a `datasets.map` baseline, the speed-up from 1 to N processes, and a resume after SIGKILL.

The corpus is the bundled en/zh/code records repeated (each copy's records tagged with the copy number, so the text
is not byte-identical from copy to copy) up to `--mb` megabytes of JSONL, then written as plain JSONL, as `.jsonl.zst`
(shards of 64 MB of JSONL as SlimPajama ships, or smaller so that there are 16) and as Parquet (row groups of 2,000
rows). Every pipeline runs in a fresh process (`--one`), so peak memory is its own: anonymous RSS (RssAnon, sampled
every 20 ms; memory-mapped input and output files are page cache, not counted) of the main process and of the
largest worker. "1 process" runs
with the tokenizer's own threads off (TOKENIZERS_PARALLELISM=false), i.e. on one core.

- floor: N processes each read a byte range of the plain JSONL, `json.loads` every line and run the fast tokenizer's
  `encode_batch` on the text; nothing is packed or written. No pipeline can do less.
- datasets.map: bench/data_prep.py's baseline-fast (`load_dataset("json")`, `.map` with the fast tokenizer, Python
  greedy packing, `save_to_disk`), on the plain JSONL.

    python bench/data_prep_formats.py --mb 1000 --num_proc 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from colossal_shear.bundled import CATEGORIES, corpus_files, train_sentencepiece  # noqa: E402

ROWS_PER_GROUP = 2_000
ZST_SHARD = 64 << 20


def make_corpus(d: Path, mb: int) -> dict:
    import pyarrow as pa

    records = []
    for path, _cat in zip(corpus_files(), CATEGORIES):
        records += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for kind in ("jsonl", "zst", "parquet"):
        (d / kind).mkdir(parents=True)
    total, copy, shard = 0, 0, 0
    plain = open(d / "jsonl" / "corpus.jsonl", "wb")
    zst_size, zst = 0, None
    shard_bytes = max(1 << 20, min(ZST_SHARD, mb * 1_000_000 // 16))  # at least 16 shards: units for every core
    rows: list[dict] = []
    writer = None
    while total < mb * 1_000_000:
        for r in records:
            r = {**r, "target": f"[{copy}] " + r["target"]}
            line = (json.dumps(r, ensure_ascii=False) + "\n").encode()
            plain.write(line)
            if zst is None or zst_size >= shard_bytes:
                if zst is not None:
                    zst.close()
                zst = pa.CompressedOutputStream(str(d / "zst" / f"shard-{shard:04d}.jsonl.zst"), "zstd")
                shard, zst_size = shard + 1, 0
            zst.write(line)
            zst_size += len(line)
            rows.append(r)
            total += len(line)
        copy += 1
        if len(rows) >= ROWS_PER_GROUP:
            writer = _parquet_rows(d, rows, writer)
            rows = []
    writer = _parquet_rows(d, rows, writer)
    writer.close()
    zst.close()
    plain.close()
    return {k: sum(f.stat().st_size for f in (d / k).iterdir()) for k in ("jsonl", "zst", "parquet")}


def _parquet_rows(d: Path, rows: list[dict], writer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = ("source", "target", "category")
    table = pa.table({c: pa.array([r.get(c) for r in rows], pa.string()) for c in cols})
    if writer is None:
        writer = pq.ParquetWriter(str(d / "parquet" / "corpus.parquet"), table.schema, compression="zstd")
    if rows:
        writer.write_table(table, row_group_size=ROWS_PER_GROUP)
    return writer


def _floor_worker(args) -> int:
    path, start, end, tok_dir = args
    from transformers import AutoTokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    backend = AutoTokenizer.from_pretrained(tok_dir).backend_tokenizer
    n, texts = 0, []
    with open(path, "rb") as f:
        f.seek(start)
        pos = start
        for line in f:
            if pos >= end:
                break
            pos += len(line)
            r = json.loads(line)
            texts += [r["source"]] if r.get("source") else []
            texts.append(r["target"])
            if len(texts) >= 256:
                n += sum(len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False))
                texts = []
    if texts:
        n += sum(len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False))
    return n


def run_floor(path: Path, tok: Path, num_proc: int) -> int:
    import multiprocessing as mp

    from colossal_shear.data.sources import _line_splits

    spans = _line_splits(str(path), path.stat().st_size, 16 << 20)
    with mp.get_context("fork").Pool(num_proc) as pool:
        return sum(pool.imap_unordered(_floor_worker, [(str(path), s, e, str(tok)) for s, e in spans]))


def run_ours(inp: Path, tok: Path, out: Path, max_length: int, num_proc: int) -> int:
    from colossal_shear.data import PrepareConfig, prepare_dataset

    m = prepare_dataset(
        PrepareConfig([str(inp)], str(tok), str(out), max_length=max_length, num_proc=num_proc, progress=False)
    )
    return m["totals"]["tokens"]


def _rss_anon_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024
    except (OSError, StopIteration, ValueError):
        return 0.0


class PeakMemory:
    """Peak anonymous RSS of this process and of its largest child, sampled in a thread."""

    def __init__(self):
        import threading

        self.main = self.worker = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(0.02):
            self.main = max(self.main, _rss_anon_mb(me.pid))
            for child in me.children(recursive=True):
                self.worker = max(self.worker, _rss_anon_mb(child.pid))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def one(args) -> None:
    """Run one pipeline in this process and print {seconds, tokens, rss_main_mb, rss_worker_mb} as JSON."""
    work, tok = Path(args.work), Path(args.work) / "tokenizer"
    out = work / f"out-{args.one}"
    peak = PeakMemory()
    t0 = time.perf_counter()
    if args.one == "floor":
        tokens = run_floor(work / "jsonl" / "corpus.jsonl", tok, args.num_proc)
    elif args.one == "datasets.map":
        from data_prep import run_baseline

        tokens = run_baseline(work / "jsonl", tok, out, args.max_length, args.num_proc, False)
    else:
        kind = args.one.split("-")[1]
        tokens = run_ours(work / kind, tok, out, args.max_length, args.num_proc)
    seconds = time.perf_counter() - t0
    peak.stop()
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"seconds": seconds, "tokens": tokens, "rss_main_mb": peak.main, "rss_worker_mb": peak.worker}))


def measure(work: Path, name: str, num_proc: int, max_length: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--one",
        name,
        "--work",
        str(work),
        "--num_proc",
        str(num_proc),
        "--max_length",
        str(max_length),
    ]
    env = {**os.environ, **({"TOKENIZERS_PARALLELISM": "false"} if num_proc == 1 else {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def resume_run(work: Path, num_proc: int, max_length: int) -> tuple[float, float, int]:
    """(seconds of the rerun after SIGKILL at about half, seconds of the killed run, units done then), zstd input."""
    out = work / "out-resume"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve().parent.parent / "data_prep" / "prepare_pretrain_dataset.py"),
        "--data_input_dirs",
        str(work / "zst"),
        "--tokenizer_dir",
        str(work / "tokenizer"),
        "--data_output_dirs",
        str(out),
        "--max_length",
        str(max_length),
        "--num_proc",
        str(num_proc),
        "--no_progress",
    ]
    total = len(list((work / "zst").iterdir()))
    units = work / ".out-resume.work" / "units"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and (not units.is_dir() or len(list(units.glob("*.json"))) < total // 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at, done = time.perf_counter() - t0, len(list(units.glob("*.json")))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    shutil.rmtree(out)
    return seconds, killed_at, done


def table(results: dict, sizes: dict, args) -> None:
    floor = results["floor"]["seconds"]
    base = results.get("datasets.map", {}).get("seconds", float("nan"))
    print(
        f"corpus: {sizes['jsonl'] / 1e6:,.0f} MB JSONL = {sizes['zst'] / 1e6:,.0f} MB .jsonl.zst = "
        f"{sizes['parquet'] / 1e6:,.0f} MB Parquet; {results['floor']['tokens']:,} tokens of text; max_length "
        f"{args.max_length}; {os.cpu_count()} CPUs; python {platform.python_version()}"
    )
    print("| pipeline | num_proc | seconds | tokens/s | / floor | / datasets.map | peak anon. RSS main / worker (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {r['num_proc']} | {r['seconds']:.1f} | {r['tokens'] / r['seconds']:,.0f} | "
            f"{r['seconds'] / floor:.2f}x | {r['seconds'] / base:.2f}x | {r['rss_main_mb']:.0f} / "
            f"{r['rss_worker_mb']:.0f} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=1000, help="megabytes of JSONL to generate")
    p.add_argument("--max_length", type=int, default=4096)
    p.add_argument("--num_proc", type=int, default=os.cpu_count())
    p.add_argument("--skip", default="", help="comma-separated pipelines to leave out (e.g. datasets.map,ours-1proc)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return one(args)
    work = Path(tempfile.mkdtemp(prefix="bench-data-prep-formats-"))
    try:
        train_sentencepiece(work / "tokenizer")
        sizes = make_corpus(work, args.mb)
        skip = set(args.skip.split(","))
        plan = [
            ("floor", args.num_proc),
            ("ours-parquet", args.num_proc),
            ("ours-zst", args.num_proc),
            ("ours-jsonl", args.num_proc),
            ("ours-jsonl", 1),
            ("datasets.map", args.num_proc),
        ]
        results = {}
        for name, n in plan:
            label = name if n == args.num_proc else f"{name} (1 process)"
            if name in skip or label in skip or (n == 1 and "ours-1proc" in skip):
                continue
            results[label] = {**measure(work, name, n, args.max_length), "num_proc": n}
        ours = {r["tokens"] for k, r in results.items() if k.startswith("ours") or k == "datasets.map"}
        assert len(ours) <= 1, f"pipelines disagree on the output tokens: {results}"
        table(results, sizes, args)
        if "resume" not in skip:
            again, killed_at, done = resume_run(work, args.num_proc, args.max_length)
            print(
                f"\nresume (zstd input): killed with SIGKILL after {killed_at:.1f} s with {done} of "
                f"{len(list((work / 'zst').iterdir()))} units done; the rerun took {again:.1f} s "
                f"(an uninterrupted run: {results.get('ours-zst', {}).get('seconds', float('nan')):.1f} s)"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
