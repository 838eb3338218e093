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
"""

from __future__ import annotations

from collections.abc import Callable


def _greedy_merges(text: str, rank: Callable[[str, str], float | None], trace: list[str] | None) -> list[str]:
    """BPE as both SentencePiece and Hugging Face apply it: repeatedly merge the adjacent pair of best (lowest) rank,
    the leftmost on ties, until no pair has a rank."""
    syms = list(text)
    while len(syms) > 1:
        best, at = None, -1
        for i in range(len(syms) - 1):
            r = rank(syms[i], syms[i + 1])
            if r is not None and (best is None or r < best):
                best, at = r, i
        if best is None:
            break
        merged = syms[at] + syms[at + 1]
        syms[at : at + 2] = [merged]
        if trace is not None:
            trace.append(merged)
    return syms


class ScoreBPE:
    """SentencePiece BPE over a {piece: score} map (NORMAL pieces): the highest-scoring merge first."""

    def __init__(self, scores: dict[str, float]):
        self.scores = scores

    def segment(self, text: str, trace: list[str] | None = None) -> list[str]:
        def rank(left, right):
            score = self.scores.get(left + right)
            return None if score is None else -score

        return _greedy_merges(text, rank, trace)


class RankBPE:
    """Hugging Face BPE over explicit merges {(left, right): rank}."""

    def __init__(self, ranks: dict[tuple[str, str], int]):
        self.ranks = ranks

    def segment(self, text: str, trace: list[str] | None = None) -> list[str]:
        return _greedy_merges(text, lambda left, right: self.ranks.get((left, right)), trace)


def make_reachable(
    piece: str,
    segment: Callable[[str], list[str]],
    add_link: Callable[[str, str, bool], None],
    in_vocab: Callable[[str], bool] | None = None,
    char_starts: set[int] | None = None,
) -> list[str]:
    """Make `piece` the result of BPE on its own text by adding links (a link joins two adjacent symbols;
    `add_link(left, right, final)` adds it, `final` when it produces `piece` itself). Returns the intermediate
    pieces created, left to right.

    New links always rank below every existing one, so BPE first reaches the segmentation it reached before; each
    new link then joins two adjacent symbols, shrinking the segmentation by one, so a piece of n symbols needs at
    most n - 2 intermediates (plus its own link). Which two: first a pair that already forms a vocabulary entry
    without a link (another requested piece: no intermediate at all), then a pair inside one character (byte-level
    BPE: whole characters before partial ones; `char_starts` are the offsets where characters start), then the
    leftmost pair."""
    intermediates: list[str] = []
    seg = segment(piece)
    guard = len(piece) + 1
    while len(seg) > 1 and guard > 0:
        guard -= 1
        at = _choose_pair(seg, in_vocab, char_starts)
        left, right = seg[at], seg[at + 1]
        final = len(seg) == 2
        merged = left + right
        known = final or (in_vocab is not None and in_vocab(merged))
        add_link(left, right, final)
        if not known:
            intermediates.append(merged)
        seg = segment(piece)
    if seg != [piece]:  # pragma: no cover - the construction above cannot fail; keep the invariant loud
        raise RuntimeError(f"internal error: could not make {piece!r} reachable (got {seg})")
    return intermediates


def _choose_pair(seg: list[str], in_vocab, char_starts) -> int:
    if in_vocab is not None:
        for i in range(len(seg) - 1):
            if in_vocab(seg[i] + seg[i + 1]):
                return i
    if char_starts is not None:
        offset = 0
        for i in range(len(seg) - 1):
            offset += len(seg[i])
            if offset not in char_starts:
                return i
    return 0
