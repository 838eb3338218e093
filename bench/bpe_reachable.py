#!/usr/bin/env python3
"""How long does `--expand_tokens_file` take for one long piece? `bpe.make_reachable` against the quadratic version it
replaced (kept below as `naive_make_reachable`, the baseline, run in the same process on the same input).

For each length, one piece of that many characters of Chinese text from the bundled corpus (no spaces) is added to
the bundled SentencePiece tokenizer and to the bundled byte-level BPE (Llama-3 layout) by the editors' `expand`, as
`init_tokenizer.py` does (planning only: a SentencePiece piece over 7,999 bytes would then be rejected, as
`sentencepiece` cannot load it); the baseline runs the same `expand` with the old algorithm swapped in, its
leftmost-pair rule included. The naive version runs only up to `--naive_max` characters (it is cubic in the worst
case). `naive_make_reachable(..., shortest=True)` has today's pair rule: `tests/test_vocab.py::
test_fast_bpe_matches_the_naive_reference` checks that the fast version gives exactly its links and intermediates.

    python bench/bpe_reachable.py --lengths 256,1024,4096,16384,262144 --naive_max 256
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from colossal_shear.vocab import bpe, hf_fast_edit, sentencepiece_edit  # noqa: E402


# -- the baseline: the algorithm before (re-segment the whole piece after each link, a full scan per merge) --------
def naive_segment(text: str, rank, trace: list[str] | None = None) -> list[str]:
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


def naive_make_reachable(piece, bpe_, add_link, in_vocab=None, char_starts=None, shortest=False) -> list[str]:
    """The original; `shortest`: the pair rule of the present version (the shortest pair, not the leftmost, after
    the vocabulary and inside-character rules), for the equivalence test."""
    intermediates: list[str] = []
    seg = naive_segment(piece, bpe_.rank)
    guard = len(piece) + 1
    while len(seg) > 1 and guard > 0:
        guard -= 1
        at = _naive_choose(seg, in_vocab, char_starts, shortest)
        left, right = seg[at], seg[at + 1]
        final = len(seg) == 2
        merged = left + right
        known = final or (in_vocab is not None and in_vocab(merged))
        add_link(left, right, final)
        if not known:
            intermediates.append(merged)
        seg = naive_segment(piece, bpe_.rank)
    if seg != [piece]:
        raise RuntimeError("naive: not reachable")
    return intermediates


def _naive_choose(seg, in_vocab, char_starts, shortest) -> int:
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
    if shortest:
        return min(range(len(seg) - 1), key=lambda i: (len(seg[i]) + len(seg[i + 1]), i))
    return 0


# -------------------------------------------------------------------------------------------------------------------
def chinese_text(n: int) -> str:
    from colossal_shear.bundled import corpus_records

    text = "".join(r["target"] for r in corpus_records() if r.get("category") == "zh")
    text = "".join(ch for ch in text if ch.isalpha() and ord(ch) > 0x2E80)  # one pre-token: CJK letters only
    return (text * (n // len(text) + 1))[:n]


def timed_expand(editor_factory, piece_text: str, naive: bool) -> tuple[float, int]:
    vocab = editor_factory()
    # the piece as the tokenizer sees it; past SentencePiece's 7,999-byte limit on loading, planning still runs
    internal = vocab.to_internal(piece_text)[0] or piece_text
    for module in (sentencepiece_edit, hf_fast_edit):
        module.make_reachable = naive_make_reachable if naive else bpe.make_reachable
    t = time.perf_counter()
    res = vocab.expand([internal])
    return time.perf_counter() - t, len(res.intermediates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="256,1024,4096,16384,262144")
    ap.add_argument("--naive_max", type=int, default=256, help="run the baseline up to this length")
    args = ap.parse_args()
    from colossal_shear.bundled import build_bundled
    from colossal_shear.vocab.toy import build_byte_level_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bpe-reachable-"))
    sp_dir = build_bundled(work)["tokenizer"]
    hf_dir = build_byte_level_tokenizer(work / "byte-level")
    editors = {
        "sentencepiece": lambda: sentencepiece_edit.SentencePieceVocab(sp_dir),
        "byte-level": lambda: hf_fast_edit.HFFastVocab(hf_dir),
    }
    print("| tokenizer | piece chars | intermediates | naive (s) | make_reachable (s) | ratio |")
    print("|---|---|---|---|---|---|")
    for n in (int(x) for x in args.lengths.split(",")):
        text = chinese_text(n)
        for name, factory in editors.items():
            fast, k = timed_expand(factory, text, naive=False)
            if n <= args.naive_max:
                slow, k0 = timed_expand(factory, text, naive=True)
                cells = f"{slow:.2f} | {fast:.3f} | {slow / fast:.0f}x"
            else:
                cells = f"not run | {fast:.3f} | "
            print(f"| {name} | {n:,} | {k:,} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
