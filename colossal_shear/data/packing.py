"""Packing documents into fixed-length sequences without losing a token.

Per category, documents are concatenated in input order and the stream is cut every `max_length` tokens: a document
longer than the space left in a sequence is split and its continuation starts the next sequence as a new segment
(its position ids restart there; the trainer accepts that). So no document is truncated, no tail is dropped, and
only the last sequence of each category carries padding. Boundaries are kept as `doc_lengths` (segment lengths per
sequence), which lets the trainer stop packed documents from attending to each other.

The cut is vectorised (numpy over the whole batch) and the packer holds only the unfinished tail (< max_length
tokens), so memory is bounded by one batch, not by the corpus.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from colossal_shear.data.tokenization import IGNORE_INDEX


@dataclass
class PackedRows:
    """A block of finished sequences of one category."""

    input_ids: np.ndarray  # (n, max_length) int32, right-padded
    labels: np.ndarray  # (n, max_length) int32, -100 on BOS, source and padding
    segment_lengths: np.ndarray  # flat int32: the doc_lengths of every row, concatenated
    segment_counts: np.ndarray  # (n,) int64: how many segments each row has
    num_tokens: np.ndarray  # (n,) int32: non-padding tokens
    loss_tokens: np.ndarray  # (n,) int32: labels != -100
    documents: np.ndarray  # (n,) int32: segments that start a document (a continuation does not count)

    def __len__(self) -> int:
        return len(self.input_ids)


class CategoryPacker:
    def __init__(self, max_length: int, pad_id: int):
        self.max_length = max_length
        self.pad_id = pad_id
        self._ids = np.empty(0, np.int32)
        self._labels = np.empty(0, np.int32)
        self._ends = np.empty(0, np.int64)  # end offsets of the documents in the pending tail
        self._mid_doc = False  # the pending tail starts with the continuation of a split document

    def add(self, ids: np.ndarray, labels: np.ndarray, doc_lengths: np.ndarray) -> PackedRows | None:
        """Append whole documents (flat ids/labels and their lengths); return the sequences they complete."""
        if len(doc_lengths) == 0:
            return None
        base = len(self._ids)
        ids = np.concatenate([self._ids, ids]) if base else ids
        labels = np.concatenate([self._labels, labels]) if base else labels
        ends = np.concatenate([self._ends, base + np.cumsum(doc_lengths, dtype=np.int64)])
        L = self.max_length
        n_full = len(ids) // L
        if n_full == 0:
            self._ids, self._labels, self._ends = ids, labels, ends
            return None
        cut = n_full * L
        rows = self._rows(ids[:cut], labels[:cut], ends[ends <= cut], n_full)
        self._ids, self._labels = ids[cut:].copy(), labels[cut:].copy()
        self._ends = ends[ends > cut] - cut
        self._mid_doc = len(self._ids) > 0 and not np.any(ends == cut)
        return rows

    def finish(self) -> PackedRows | None:
        """The last, padded sequence (None when the stream ended exactly on a sequence boundary)."""
        n = len(self._ids)
        if n == 0:
            return None
        ids = np.full(self.max_length, self.pad_id, np.int32)
        labels = np.full(self.max_length, IGNORE_INDEX, np.int32)
        ids[:n], labels[:n] = self._ids, self._labels
        rows = self._rows(ids, labels, self._ends, 1, valid=n)
        self.__init__(self.max_length, self.pad_id)
        return rows

    def _rows(self, ids, labels, ends, n_rows, valid=None) -> PackedRows:
        L = self.max_length
        total = n_rows * L if valid is None else valid
        bounds = np.union1d(ends, np.arange(L, total + 1, L, dtype=np.int64))  # doc ends and row ends, sorted
        starts = np.concatenate([[0], bounds[:-1]])
        row = starts // L
        is_doc_start = np.isin(starts, ends)
        is_doc_start[0] = not self._mid_doc
        ids2 = ids.reshape(n_rows, L)
        labels2 = labels.reshape(n_rows, L)
        num_tokens = np.full(n_rows, L, np.int32) if valid is None else np.array([valid], np.int32)
        return PackedRows(
            input_ids=ids2,
            labels=labels2,
            segment_lengths=(bounds - starts).astype(np.int32),
            segment_counts=np.bincount(row, minlength=n_rows),
            num_tokens=num_tokens,
            loss_tokens=(labels2 != IGNORE_INDEX).sum(1).astype(np.int32),
            documents=np.bincount(row, weights=is_doc_start, minlength=n_rows).astype(np.int32),
        )
