"""Loss-masked tokenisation of records into documents, and the order-preserving worker pool that runs it.

A document is [BOS] + source ids + target ids + [EOS], each part tokenised with add_special_tokens=False (as
Colossal-LLaMA-2 does); its labels are -100 on BOS and the source, the token ids on the target and the EOS. Workers
decode, validate and tokenise whole line batches and return flat numpy arrays (cheap to pickle); the pool keeps a
bounded window of batches in flight and yields results in input order, so the output does not depend on
`num_proc` and memory does not grow with the corpus.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from colossal_shear.core.interrupt import worker_signals
from colossal_shear.data.records import (
    UNENCODABLE_TEXT,
    UNKNOWN_CATEGORY,
    DataPrepError,
    Record,
    RecordError,
    parse_record,
)

IGNORE_INDEX = -100


def load_tokenizer(tokenizer_dir: str | os.PathLike):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def padding_id(tokenizer) -> int:
    """The contract's padding id: pad token if the tokenizer has one, else UNK, else 0 (never EOS: padding with
    EOS would make the real EOS separators indistinguishable from padding)."""
    for tid in (tokenizer.pad_token_id, tokenizer.unk_token_id):
        if tid is not None:
            return int(tid)
    return 0


class DocumentTokenizer:
    """Turns records into documents with loss masks. Fast tokenizers go straight to the Rust backend's
    `encode_batch` (the same ids as `tokenizer(text, add_special_tokens=False)`, minus the Python overhead)."""

    def __init__(self, tokenizer):
        if tokenizer.eos_token_id is None:
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise DataPrepError(
                f"tokenizer {name} has no EOS token (eos_token_id is None): every document must end "
                "with EOS; set eos_token in its tokenizer_config.json"
            )
        self.tokenizer = tokenizer
        self.bos = tokenizer.bos_token_id  # None: documents start without BOS (e.g. Qwen-style tokenizers)
        self.eos = int(tokenizer.eos_token_id)
        self._backend = tokenizer.backend_tokenizer if getattr(tokenizer, "is_fast", False) else None

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        if self._backend is not None:
            return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]
        return [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]

    def documents(self, records: Sequence[Record]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(flat input ids, flat labels, per-document lengths) for whole records, in order."""
        n = len(records)
        if n == 0:
            empty = np.empty(0, np.int32)
            return empty, empty.copy(), np.empty(0, np.int64)
        targets = self.encode([r.target for r in records])
        with_source = [i for i, r in enumerate(records) if r.source]
        sources: list[list[int]] = [[] for _ in range(n)]
        for i, ids in zip(with_source, self.encode([records[i].source for i in with_source])):
            sources[i] = ids
        head = [] if self.bos is None else [self.bos]
        flat: list[int] = []
        prefix = np.empty(n, np.int64)  # masked: BOS + source
        suffix = np.empty(n, np.int64)  # learned: target + EOS
        for i in range(n):
            flat += head
            flat += sources[i]
            flat += targets[i]
            flat.append(self.eos)
            prefix[i] = len(head) + len(sources[i])
            suffix[i] = len(targets[i]) + 1
        ids = np.asarray(flat, dtype=np.int32)
        learn = np.repeat(np.tile(np.array([False, True]), n), np.stack([prefix, suffix], 1).ravel())
        labels = np.where(learn, ids, np.int32(IGNORE_INDEX)).astype(np.int32)
        return ids, labels, prefix + suffix


@dataclass
class TokenizedBatch:
    """One line batch after the worker: documents in input order, plus the lines it rejected."""

    ids: np.ndarray
    labels: np.ndarray
    doc_lengths: np.ndarray
    categories: list[str]
    errors: list[RecordError] = field(default_factory=list)
    lines: int = 0


_WORKER: DocumentTokenizer | None = None


def init_worker(tokenizer_dir: str, in_pool: bool) -> None:
    """Pool initializer. Under fork the parent's tokenizer is inherited; under spawn it is loaded here. Inside a
    pool each worker is one core, so the Rust tokenizer's own thread pool is turned off to avoid oversubscription."""
    global _WORKER
    if in_pool:
        worker_signals()  # Ctrl-C and SIGTERM are the parent's to handle; gone with the parent
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if _WORKER is None:
        _WORKER = DocumentTokenizer(load_tokenizer(tokenizer_dir))


def set_worker_tokenizer(doc_tokenizer: DocumentTokenizer | None) -> None:
    global _WORKER
    _WORKER = doc_tokenizer


def tokenize_lines(task: tuple[str, list[tuple[int, bytes]]]) -> TokenizedBatch:
    """Worker body: parse and validate each line of one file's batch, then tokenise the valid records together."""
    file, lines = task
    return tokenize_items(file, lines, parse_record)


def tokenize_items(file: str, items: list[tuple[int, object]], parse: Callable) -> TokenizedBatch:
    """Parse each (number, payload) item with `parse(payload, file, number)` (a Record, None to skip, or a
    RecordError raised), then tokenise the valid records together."""
    records: list[Record] = []
    numbers: list[int] = []
    errors: list[RecordError] = []
    for number, raw in items:
        try:
            rec = parse(raw, file, number)
        except RecordError as e:
            errors.append(e)
            continue
        if rec is not None:
            records.append(rec)
            numbers.append(number)
    assert _WORKER is not None, "init_worker was not called"
    try:
        ids, labels, lengths = _WORKER.documents(records)
    except Exception:  # e.g. a lone surrogate ("\ud800") that the Rust tokenizer refuses: find the record(s)
        keep = []
        for rec, number in zip(records, numbers):
            try:
                _WORKER.documents([rec])
                keep.append(rec)
            except Exception as e:  # noqa: BLE001 - reported with file and line
                errors.append(
                    RecordError(
                        f"{file}:{number}: text cannot be tokenised: {e} (field 'target' or 'source')",
                        UNENCODABLE_TEXT,
                        file,
                        number,
                    )
                )
        errors.sort(key=lambda e: e.line)
        records = keep
        ids, labels, lengths = _WORKER.documents(records)
    return TokenizedBatch(ids, labels, lengths, [r.category or UNKNOWN_CATEGORY for r in records], errors, len(items))


class OrderedPool:
    """Like Pool.imap (results in task order) but never more than `window` tasks in flight, so a lazy task stream
    (a corpus larger than RAM) is pulled only as fast as results are consumed. Tasks are (payload, meta) pairs;
    meta stays in this process and comes back with the result. num_proc <= 1 runs in this process.

    The workers are forked on __enter__, before the caller starts threads (progress bars) or Arrow writers."""

    def __init__(self, fn: Callable, num_proc: int, initializer: Callable, initargs: tuple, window: int | None = None):
        self.fn, self.num_proc, self.initializer, self.initargs = fn, num_proc, initializer, initargs
        self.window = window or 2 * num_proc
        self._pool = None

    def __enter__(self) -> OrderedPool:
        if self.num_proc <= 1:
            self.initializer(*self.initargs, False)
        else:
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            self._pool = mp.get_context(method).Pool(self.num_proc, self.initializer, (*self.initargs, True))
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.terminate()  # results are all consumed on success; on an error nothing more is wanted
            self._pool.join()
            self._pool = None

    def map(self, tasks: Iterable[tuple]) -> Iterator[tuple]:
        if self._pool is None:
            for payload, meta in tasks:
                yield self.fn(payload), meta
            return
        pending: deque = deque()
        for payload, meta in tasks:
            pending.append((self._pool.apply_async(self.fn, (payload,)), meta))
            if len(pending) >= self.window:
                res, m = pending.popleft()
                yield res.get(), m
        while pending:
            res, m = pending.popleft()
            yield res.get(), m
