"""results.json (written atomically) and the table shown on stdout.

{"model": DIR,
 "tasks": {"piqa": {"acc": ..., "acc_norm": ..., "acc_stderr": ..., "n": ...}, ...},
 "text": {"zh": {"nats_per_char": ..., "tokens_per_char": ..., "loss": ..., "chars": ..., "tokens": ...,
                 "texts": ...}, ...}}
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from colossal_shear.core.fsutil import atomic_write_text


def make_results(model: str | Path, tasks: dict | None, text: dict | None) -> dict:
    return {"model": str(model), "tasks": tasks or {}, "text": text or {}}


def write_results(path: str | Path, results: dict) -> Path:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(Path(path), json.dumps(results, indent=2, ensure_ascii=False) + "\n")


def read_results(path: str | Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def correct(score: float | None, n: int) -> int | None:
    """How many of `n` documents a score of accuracy type (a mean of 0/1 outcomes: acc, acc_norm) counts as right."""
    if score is None:
        return None
    count = round(score * n)
    if abs(score * n - count) > 1e-6 * max(1, n):
        raise ValueError(f"{score} over {n} documents is not a fraction of right answers")
    return count


def pool(chunks: list[dict]) -> dict:
    """{acc, acc_norm, acc_stderr, n} of the union of disjoint pieces of one task, each {acc, acc_norm, n, ...}: the
    right answers summed over the pieces, and lm-eval's standard error of a mean (the sample standard deviation over
    sqrt(n); for 0/1 outcomes sqrt(p (1 - p) / (n - 1))), as one run over the same documents gives them."""
    n = sum(c["n"] for c in chunks)
    if not chunks or n == 0:
        raise ValueError("pool: no documents")
    out = {}
    for key in ("acc", "acc_norm"):
        counts = [correct(c[key], c["n"]) for c in chunks]
        if all(k is None for k in counts):
            out[key] = None
        elif any(k is None for k in counts):
            raise ValueError(f"pool: {key} is missing from some pieces only")
        else:
            out[key] = sum(counts) / n
    p = out["acc"]
    out["acc_stderr"] = None if n < 2 or p is None else math.sqrt(p * (1 - p) / (n - 1))
    out["n"] = n
    return out


def _fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def format_table(results: dict) -> str:
    """Plain-text tables: accuracy per task, then text metrics per category."""
    lines = [f"model: {results['model']}"]
    if results["tasks"]:
        lines.append(f"{'task':<16} {'n':>6} {'acc':>8} {'± stderr':>9} {'acc_norm':>9}")
        for name, s in results["tasks"].items():
            lines.append(
                f"{name:<16} {s['n']:>6} {_fmt(s['acc']):>8} {_fmt(s['acc_stderr']):>9} {_fmt(s['acc_norm']):>9}"
            )
    if results["text"]:
        lines.append(f"{'text':<16} {'chars':>9} {'nats/char':>10} {'tokens/char':>12} {'loss':>8}")
        for cat, m in results["text"].items():
            lines.append(
                f"{cat:<16} {m['chars']:>9} {m['nats_per_char']:>10.4f} {m['tokens_per_char']:>12.4f} {m['loss']:>8.4f}"
            )
    return "\n".join(lines)
