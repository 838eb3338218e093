"""Reference BPE in Python, for planning edits on single pieces (never for encoding corpora).

Two flavours, the same greedy algorithm:
- SentencePiece BPE: the pair whose concatenation is a piece with the highest score merges first (ties: leftmost);
  merges are implicit, every adjacent pair that forms a piece can merge.
- Hugging Face BPE: explicit merges; the pair with the lowest merge rank merges first (ties: leftmost).

Uses:
- expansion: is a new piece actually produced by the BPE, or does it need intermediate pieces (and which)?
- pruning: which intermediate pieces does a kept piece's derivation pass through (they must be kept too, or the kept
  piece can no longer be built and text that used it would tokenize differently)?
A piece that appears as a token in some text was built inside its span only, and merges inside the span happen in
the same order as for the piece on its own (every merge is the best one available), so the derivation of the piece
alone is the derivation it has in context.

Cost: the symbols are a linked list with a heap of the pairs that have a rank, so one merge costs O(log n) plus the
length of the merged string; `make_reachable` continues from the segmentation it has (a new link ranks below every
existing one, so BPE reaches that segmentation first) instead of segmenting the piece again after each link. A piece
of n characters takes O(n log n) in practice (a 16k-character piece: well under a second, where the quadratic
re-segmentation took minutes; docs/benchmarks.md).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

Rank = Callable[[str, str], "float | None"]


class Symbols:
    """The symbols of one text under greedy BPE: a linked list keyed by start offset, and a heap of the adjacent
    pairs that have a rank. `run()` merges the best pair (lowest rank, leftmost on ties) until none has a rank.

    With `track`, it also indexes every adjacent pair by its concatenation (for `link_added`) and keeps the candidate
    pairs `make_reachable` chooses from: pairs whose concatenation `in_vocab`, and boundaries inside a character
    (offsets not in `char_starts`)."""

    def __init__(self, text: str, rank: Rank, trace: list[str] | None = None, track: bool = False, in_vocab=None):
        n = self.end = len(text)
        self.sym: list[str | None] = list(text)  # sym[start]: the symbol starting there; None inside a symbol
        self.nxt, self.prv = list(range(1, n + 1)), list(range(-1, n - 1))
        self.count, self.rank, self.trace, self.track, self.in_vocab = n, rank, trace, track, in_vocab
        self.heap: list[tuple] = []  # (rank, start, len(left), len(right)): valid while those lengths hold
        self.concat: list[str | None] = [None] * n  # track: concat[start] of the pair starting there
        self.by_concat: dict[str, set[int]] = {}
        self.vocab_heap: list[int] = []  # track: starts of pairs whose concatenation was in the vocabulary
        self.short_heap: list[tuple[int, int]] = []  # track: (length of the concatenation, start) of every pair
        for i in range(n - 1):
            self._pair_formed(i)

    def _pair_formed(self, i: int) -> None:
        left, right = self.sym[i], self.sym[self.nxt[i]]
        r = self.rank(left, right)
        if r is not None:
            heapq.heappush(self.heap, (r, i, len(left), len(right)))
        if self.track:
            merged = left + right
            self.concat[i] = merged
            self.by_concat.setdefault(merged, set()).add(i)
            heapq.heappush(self.short_heap, (len(merged), i))
            if self.in_vocab is not None and self.in_vocab(merged):
                heapq.heappush(self.vocab_heap, i)

    def _pair_gone(self, i: int) -> None:
        if self.track and i >= 0 and self.concat[i] is not None:
            starts = self.by_concat[self.concat[i]]
            starts.discard(i)
            if not starts:
                del self.by_concat[self.concat[i]]
            self.concat[i] = None

    def merge(self, i: int) -> None:
        j = self.nxt[i]
        k = self.nxt[j]
        self._pair_gone(self.prv[i])
        self._pair_gone(i)
        self._pair_gone(j)
        merged = self.sym[i] + self.sym[j]
        self.sym[i], self.sym[j] = merged, None
        self.nxt[i] = k
        if k < self.end:
            self.prv[k] = i
        self.count -= 1
        if self.trace is not None:
            self.trace.append(merged)
        if self.prv[i] >= 0:
            self._pair_formed(self.prv[i])
        if k < self.end:
            self._pair_formed(i)

    def run(self) -> None:
        heap, sym, end = self.heap, self.sym, self.end
        while heap:
            _, i, li, lj = heapq.heappop(heap)
            left = sym[i]
            if left is None or len(left) != li or i + li >= end or len(sym[i + li]) != lj:
                continue  # stale: one of the two symbols was merged since
            self.merge(i)

    def link_added(self, merged: str) -> None:
        """A link (or vocabulary entry) producing `merged` was added: the pairs that concatenate to it may now have a
        rank (and are now in the vocabulary); merge on from the present segmentation."""
        for i in list(self.by_concat.get(merged, ())):
            left, right = self.sym[i], self.sym[self.nxt[i]]
            r = self.rank(left, right)
            if r is not None:
                heapq.heappush(self.heap, (r, i, len(left), len(right)))
            if self.in_vocab is not None and self.in_vocab(merged):
                heapq.heappush(self.vocab_heap, i)
        self.run()

    def leftmost_in_vocab(self) -> int | None:
        """The start of the leftmost pair whose concatenation is in the vocabulary, or None."""
        heap = self.vocab_heap
        while heap and (self.concat[heap[0]] is None or not self.in_vocab(self.concat[heap[0]])):
            heapq.heappop(heap)
        return heap[0] if heap else None

    def leftmost_shortest(self) -> int:
        """The start of the leftmost of the pairs with the shortest concatenation (there is a pair)."""
        heap = self.short_heap
        while self.concat[heap[0][1]] is None or len(self.concat[heap[0][1]]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][1]

    def symbols(self) -> list[str]:
        out, i = [], 0
        while i < self.end:
            out.append(self.sym[i])
            i = self.nxt[i]
        return out


def _greedy_merges(text: str, rank: Rank, trace: list[str] | None) -> list[str]:
    """BPE as both SentencePiece and Hugging Face apply it: repeatedly merge the adjacent pair of best (lowest) rank,
    the leftmost on ties, until no pair has a rank."""
    symbols = Symbols(text, rank, trace)
    symbols.run()
    return symbols.symbols()


class ScoreBPE:
    """SentencePiece BPE over a {piece: score} map (NORMAL pieces): the highest-scoring merge first."""

    def __init__(self, scores: dict[str, float]):
        self.scores = scores

    def rank(self, left: str, right: str) -> float | None:
        score = self.scores.get(left + right)
        return None if score is None else -score

    def segment(self, text: str, trace: list[str] | None = None) -> list[str]:
        return _greedy_merges(text, self.rank, trace)


class RankBPE:
    """Hugging Face BPE over explicit merges {(left, right): rank}."""

    def __init__(self, ranks: dict[tuple[str, str], int]):
        self.ranks = ranks

    def rank(self, left: str, right: str) -> int | None:
        return self.ranks.get((left, right))

    def segment(self, text: str, trace: list[str] | None = None) -> list[str]:
        return _greedy_merges(text, self.rank, trace)


def make_reachable(
    piece: str,
    bpe: ScoreBPE | RankBPE,
    add_link: Callable[[str, str, bool], None],
    in_vocab: Callable[[str], bool] | None = None,
    char_starts: set[int] | None = None,
) -> list[str]:
    """Make `piece` the result of BPE on its own text by adding links (a link joins two adjacent symbols;
    `add_link(left, right, final)` adds it to the tables `bpe` reads, `final` when it produces `piece` itself).
    Returns the intermediate pieces created, left to right.

    New links always rank below every existing one, so BPE first reaches the segmentation it reached before; each
    new link then joins two adjacent symbols, shrinking the segmentation by one, so a piece of n symbols needs at
    most n - 2 intermediates (plus its own link). Which two: first a pair that already forms a vocabulary entry
    without a link (another requested piece: no intermediate at all), then a pair inside one character (byte-level
    BPE: whole characters before partial ones; `char_starts` are the offsets where characters start), then the
    shortest pair, the leftmost of those. Shortest first builds the piece as a balanced tree (人工 + 智能, not 人工智
    + 能): a piece of n characters adds intermediates of about n log n characters in all, not n²/2 (a chain of
    prefixes), which keeps the vocabulary small and Hugging Face's SentencePiece converter (quadratic in each
    piece's length) fast."""
    intermediates: list[str] = []
    seg = Symbols(piece, bpe.rank, track=True, in_vocab=in_vocab)
    seg.run()
    inside = [b for b in range(1, len(piece)) if char_starts is not None and b not in char_starts]  # sorted: a heap
    guard = len(piece) + 1
    while seg.count > 1 and guard > 0:
        guard -= 1
        at = _choose_pair(seg, inside)
        left, right = seg.sym[at], seg.sym[seg.nxt[at]]
        final = seg.count == 2
        merged = left + right
        known = final or (in_vocab is not None and in_vocab(merged))
        add_link(left, right, final)
        if not known:
            intermediates.append(merged)
        seg.link_added(merged)
    if seg.symbols() != [piece]:  # pragma: no cover - the construction above cannot fail; keep the invariant loud
        raise RuntimeError(f"internal error: could not make {piece[:80]!r}... reachable (got {len(seg.symbols())})")
    return intermediates


def _choose_pair(seg: Symbols, inside: list[int]) -> int:
    """The start of the pair to link: the leftmost in the vocabulary, else the leftmost whose boundary is inside a
    character (`inside`: such boundaries, a heap; merged ones are dropped here), else the leftmost shortest."""
    if seg.in_vocab is not None:
        at = seg.leftmost_in_vocab()
        if at is not None:
            return at
    while inside and seg.sym[inside[0]] is None:
        heapq.heappop(inside)
    return seg.prv[inside[0]] if inside else seg.leftmost_shortest()
