#!/usr/bin/env python3
"""Checkpoint verification speed: `colossal_shear.fsutil.file_digests` (sha256, a thread pool) against one thread
hashing the same files one after another, in the same command, and what that means for a 7B checkpoint.

Files of random bytes are written to --dir (default: a temporary directory on the same disk as /tmp) and read back
once before timing, so both runs read from the page cache: the table measures hashing, not the disk (a resume reads
from disk, so a drive slower than the hashing rate sets the pace; docs/reliability.md).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from colossal_shear.core.fsutil import file_digests  # noqa: E402

SEVEN_B_BYTES = 7e9 * 2 + 7e9 * 8  # bf16 weights + AdamW's two fp32 moments


def one_thread(paths) -> None:
    for path in paths:
        h = hashlib.sha256()
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(1 << 23):
                h.update(chunk)


def timed(fn, paths, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(paths)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--mib", type=int, default=256, help="size of each file")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        paths = []
        for i in range(args.files):
            path = Path(tmp) / f"shard-{i}.bin"
            with open(path, "wb") as f:
                for _ in range(args.mib):
                    f.write(os.urandom(1 << 20))
            paths.append(path)
        total = args.files * args.mib * (1 << 20)
        one_thread(paths)  # warm the page cache
        base = timed(one_thread, paths, args.repeats)
        rows = [("one thread, file after file (baseline)", base)]
        for threads in sorted({2, os.cpu_count() or 1, 8}):
            rows.append(
                (
                    f"file_digests, {threads} threads",
                    timed(lambda p, threads=threads: file_digests(p, threads), paths, args.repeats),
                )
            )

    print(f"{args.files} files x {args.mib} MiB, page cache, best of {args.repeats}; {os.cpu_count()} CPUs\n")
    print("| hashing | GB/s | speed-up | 7B checkpoint (70 GB), one process |")
    print("|---|---|---|---|")
    for name, seconds in rows:
        rate = total / seconds / 1e9
        print(f"| {name} | {rate:.2f} | {base / seconds:.2f}x | {SEVEN_B_BYTES / 1e9 / rate:.0f} s |")


if __name__ == "__main__":
    main()
