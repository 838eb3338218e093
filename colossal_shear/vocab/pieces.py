"""Candidate pieces: reading piece files and sorting candidates into added / duplicate / present / rejected.

Piece files are JSONL, one `{"piece": "人工智能"}` per line (the Colossal-LLaMA-2 format; other keys are ignored),
or plain text, one piece per line. In plain text, blank lines are skipped and trailing whitespace is dropped
(editors leave it; it is never meant), while leading spaces are kept: `" hello"` is the word-initial piece.
A piece longer than MAX_PIECE_CHARS characters is an error naming the file and line (a corpus given as a piece file,
a line that lost its newlines): no tokenizer has such entries, and each one costs its length in intermediate pieces.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from colossal_shear.core.errors import VocabError
from colossal_shear.vocab.corpus import is_jsonl, iter_lines, parse_json_line

WHITESPACE_MARKERS = ("\u2581",)  # SentencePiece's visible space; a piece made only of it is whitespace too
ALLOWED_CONTROL = {"\t", "\n", "\r"}
MAX_EXAMPLES = 5
MAX_PIECE_CHARS = 8192  # Llama-3's longest token has 256 bytes, SentencePiece's trainer stops at 16 characters


@dataclass
class Candidate:
    """A piece as the user wrote it, and where it came from (for messages and the report)."""

    text: str
    origin: str  # "path:line" or "learned"


def read_pieces(path: Path) -> list[Candidate]:
    """Read a piece file; a malformed line is an error naming the file and line."""
    out: list[Candidate] = []
    if is_jsonl(path, ("piece",)):
        for lineno, line, _ in iter_lines(path):
            if not line.strip():
                continue
            obj = parse_json_line(line, path, lineno)
            if "piece" not in obj:
                raise VocabError(f'{path}:{lineno}: missing the \'piece\' field (expected {{"piece": "..."}})')
            piece = obj["piece"]
            if not isinstance(piece, str):
                raise VocabError(f"{path}:{lineno}: 'piece' must be a string, got {type(piece).__name__}")
            out.append(_checked(piece, path, lineno))
    else:
        for lineno, line, _ in iter_lines(path):
            line = line.rstrip("\r\n")
            if line == "":
                continue
            # a line of spaces stays as it is so that it is counted as whitespace-only, not silently dropped
            text = line if not line.strip() else line.rstrip()
            out.append(_checked(text, path, lineno))
    return out


def _checked(text: str, path: Path, lineno: int) -> Candidate:
    if len(text) > MAX_PIECE_CHARS:
        raise VocabError(
            f"{path}:{lineno}: a piece of {len(text):,} characters; pieces have at most {MAX_PIECE_CHARS:,} "
            "(a piece file holds one piece per line: is this a corpus?)"
        )
    return Candidate(text, f"{path}:{lineno}")


def basic_rejection(text: str) -> tuple[str, str] | None:
    """(category, reason) when a piece can never be a useful vocabulary entry, whatever the tokenizer."""
    if text == "":
        return "empty", "empty piece"
    stripped = text
    for m in WHITESPACE_MARKERS:
        stripped = stripped.replace(m, " ")
    if not stripped.strip():
        return "whitespace", "whitespace-only piece"
    for ch in text:
        cat = unicodedata.category(ch)
        if (cat == "Cc" and ch not in ALLOWED_CONTROL) or cat == "Cs":
            return "invalid", f"contains the control or surrogate character U+{ord(ch):04X}"
    return None


@dataclass
class Selection:
    """The outcome of sorting candidates; `to_add` holds tokenizer-internal strings in order."""

    to_add: list[str] = field(default_factory=list)
    requested: int = 0
    duplicates: int = 0
    present: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: {"empty": 0, "whitespace": 0, "invalid": 0})
    examples: dict[str, list[str]] = field(default_factory=dict)

    def note(self, kind: str, text: str) -> None:
        ex = self.examples.setdefault(kind, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append(text)


def select_pieces(
    candidates: Iterable[Candidate],
    to_internal: Callable[[str], tuple[str | None, str | None]],
    is_present: Callable[[str], bool],
    limit: int | None = None,
    selection: Selection | None = None,
    seen: set[str] | None = None,
    present_texts: set[str] = frozenset(),
) -> Selection:
    """Sort candidates in one pass (O(n) with a set): rejected, duplicate (within the inputs), already present in
    the tokenizer, or to add. `to_internal` maps user text to the tokenizer's own piece string, or gives a reason
    why the tokenizer could never produce it; `present_texts` are special tokens, matched as written. With
    `limit`, stop once that many pieces are to be added."""
    sel = selection if selection is not None else Selection()
    seen = seen if seen is not None else set(sel.to_add)
    added_here = 0
    for cand in candidates:
        if limit is not None and added_here >= limit:
            break
        sel.requested += 1
        if cand.text in present_texts:  # e.g. a special token written out: present, whatever its pre-tokenization
            if cand.text in seen:
                sel.duplicates += 1
                sel.note("duplicate", f"{cand.origin}: {cand.text!r}")
            else:
                seen.add(cand.text)
                sel.present += 1
                sel.note("already present", f"{cand.origin}: {cand.text!r}")
            continue
        rej = basic_rejection(cand.text)
        internal = None
        if rej is None:
            internal, reason = to_internal(cand.text)
            if internal is None:
                rej = ("invalid", reason or "invalid piece")
        if rej is not None:
            sel.rejected[rej[0]] += 1
            sel.note(f"rejected ({rej[0]})", f"{cand.origin}: {cand.text!r}: {rej[1]}")
            continue
        if internal in seen:
            sel.duplicates += 1
            sel.note("duplicate", f"{cand.origin}: {cand.text!r}")
            continue
        seen.add(internal)
        if is_present(internal):
            sel.present += 1
            sel.note("already present", f"{cand.origin}: {cand.text!r}")
            continue
        sel.to_add.append(internal)
        added_here += 1
    return sel
