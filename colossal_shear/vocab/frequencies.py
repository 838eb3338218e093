"""Token frequencies over a corpus: streaming, in worker processes, with a progress bar.

The main process reads the files (so that a malformed line is reported with its file and line) and hands chunks of
texts to a pool; at most a few chunks are in flight, so memory stays flat whatever the corpus size. Each worker loads
the tokenizer once (`sentencepiece` for a tokenizer.model, `tokenizers` for a tokenizer.json) and returns a
bincount. Texts are encoded without special tokens. The same pass counts characters and tokens per category, which
is what the tokens-per-character report needs.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from colossal_shear.core.interrupt import worker_signals
from colossal_shear.vocab.corpus import iter_corpus

EncoderSpec = tuple[str, str]  # ("sentencepiece", path to tokenizer.model) or ("tokenizers", path to tokenizer.json)
CHUNK_RECORDS = 256

_worker_encoder = None


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def load_encoder(spec: EncoderSpec):
    """A function list[str] -> list[list[int]] (no special tokens)."""
    kind, path = spec
    if kind == "sentencepiece":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=path)
        return lambda texts: sp.encode(list(texts))
    if kind == "tokenizers":
        from tokenizers import Tokenizer

        tk = Tokenizer.from_file(path)
        return lambda texts: [e.ids for e in tk.encode_batch(list(texts), add_special_tokens=False)]
    raise ValueError(f"unknown encoder kind {kind!r}")


def _init_worker(spec: EncoderSpec) -> None:
    global _worker_encoder
    worker_signals()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    _worker_encoder = load_encoder(spec)


def _count_chunk(chunk: list[tuple[str, str | None]], vocab_size: int, encoder=None):
    enc = encoder or _worker_encoder
    ids = enc([t for t, _ in chunk])
    flat = np.fromiter((i for row in ids for i in row), dtype=np.int64)
    counts = np.bincount(flat, minlength=vocab_size)[:vocab_size].astype(np.int64)
    per_cat: dict[str | None, list[int]] = {}
    for (text, cat), row in zip(chunk, ids):
        c = per_cat.setdefault(cat, [0, 0, 0])
        c[0] += 1
        c[1] += len(text)
        c[2] += len(row)
    return counts, per_cat


@dataclass
class CorpusCounts:
    """Token counts (by id) and, per category (None when records have none), [records, characters, tokens]."""

    counts: np.ndarray
    per_category: dict[str | None, list[int]] = field(default_factory=dict)

    @property
    def records(self) -> int:
        return sum(v[0] for v in self.per_category.values())

    @property
    def chars(self) -> int:
        return sum(v[1] for v in self.per_category.values())

    @property
    def tokens(self) -> int:
        return sum(v[2] for v in self.per_category.values())


def _chunks(paths: Sequence[Path], bar) -> Iterable[list[tuple[str, str | None]]]:
    chunk: list[tuple[str, str | None]] = []
    for rec in iter_corpus(paths):
        chunk.append((rec.text, rec.category))
        if bar is not None:
            bar.update(rec.nbytes)
        if len(chunk) >= CHUNK_RECORDS:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def count_tokens(
    paths: Sequence[Path],
    spec: EncoderSpec,
    vocab_size: int,
    num_workers: int = 1,
    progress: bool = True,
    desc: str = "counting tokens",
) -> CorpusCounts:
    total = np.zeros(vocab_size, dtype=np.int64)
    per_cat: dict[str | None, list[int]] = {}

    def merge(result) -> None:
        nonlocal total
        counts, cats = result
        total += counts
        for k, v in cats.items():
            acc = per_cat.setdefault(k, [0, 0, 0])
            for j in range(3):
                acc[j] += v[j]

    bar = _progress_bar(paths, desc) if progress else None
    try:
        if num_workers <= 1:
            _count_here(paths, spec, vocab_size, bar, merge)
        else:
            _count_in_pool(paths, spec, vocab_size, num_workers, bar, merge)
    finally:
        if bar is not None:
            bar.close()
    return CorpusCounts(total, per_cat)


def _progress_bar(paths: Sequence[Path], desc: str):
    from tqdm import tqdm

    total = sum(Path(p).stat().st_size for p in paths)
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False, disable=None)


def _count_here(paths, spec: EncoderSpec, vocab_size: int, bar, merge) -> None:
    encoder = load_encoder(spec)
    for chunk in _chunks(paths, bar):
        merge(_count_chunk(chunk, vocab_size, encoder))


def _count_in_pool(paths, spec: EncoderSpec, vocab_size: int, num_workers: int, bar, merge) -> None:
    """Chunks counted by `num_workers` processes, at most two per worker in flight, merged in order."""
    ctx = mp.get_context("spawn")  # tokenizer libraries hold threads: never fork them
    with ctx.Pool(num_workers, initializer=_init_worker, initargs=(spec,)) as pool:
        pending: deque = deque()
        for chunk in _chunks(paths, bar):
            pending.append(pool.apply_async(_count_chunk, (chunk, vocab_size)))
            while len(pending) >= 2 * num_workers:
                merge(pending.popleft().get())
        while pending:
            merge(pending.popleft().get())
