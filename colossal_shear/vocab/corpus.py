"""Reading the text inputs (corpora, piece lists, evaluation files) with errors that name the file and line.

Two formats, told apart by the file name and, failing that, by the first non-empty line:
- JSONL (`.jsonl`, `.json`, `.ndjson`, or a first line that is a JSON object carrying one of the expected keys);
- plain UTF-8 text.
Lines are decoded one by one from bytes so that a bad byte is reported at its real line number.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from .errors import VocabError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_KEYS = ("text", "source", "target")
# Plain text is read in blocks of this many lines, newlines kept, so that newline and indentation tokens are seen
# (counting line by line would never see them, and pruning would then drop them).
PLAIN_BLOCK_LINES = 32


def check_readable(paths: Iterable[os.PathLike | str], what: str) -> list[Path]:
    """Fail early, before any work, when an input file is missing, a directory or unreadable."""
    out = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise VocabError(f"{what} not found: {path}")
        if path.is_dir():
            raise VocabError(f"{what} is a directory, expected a file: {path}")
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as e:
            raise VocabError(f"cannot read {what} {path}: {e.strerror or e}") from None
        out.append(path)
    return out


def _decode(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise VocabError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def iter_lines(path: Path) -> Iterator[tuple[int, str, int]]:
    """(line number, decoded line with its newline, size in bytes)."""
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                yield lineno, _decode(raw, path, lineno), len(raw)
    except OSError as e:
        raise VocabError(f"cannot read {path}: {e.strerror or e}") from None


def is_jsonl(path: Path, keys: tuple[str, ...]) -> bool:
    if path.suffix.lower() in JSONL_SUFFIXES:
        return True
    for _, line, _ in iter_lines(path):
        if line.strip():
            try:
                obj = json.loads(line)
            except ValueError:
                return False
            return isinstance(obj, dict) and any(k in obj for k in keys)
    return False


def parse_json_line(line: str, path: Path, lineno: int) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise VocabError(f"{path}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise VocabError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    return obj


@dataclass
class Record:
    """One text of a corpus: a JSONL record or a block of plain-text lines."""

    text: str
    category: str | None
    path: Path
    line: int
    nbytes: int


def _record_text(obj: dict, path: Path, lineno: int) -> str:
    if "text" in obj:
        text = obj["text"]
        if not isinstance(text, str):
            raise VocabError(f"{path}:{lineno}: field 'text' must be a string, got {type(text).__name__}")
        return text
    if "source" not in obj and "target" not in obj:
        raise VocabError(f"{path}:{lineno}: record has neither 'text' nor 'source'/'target' fields")
    parts = []
    for key in ("source", "target"):
        value = obj.get(key, "")
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise VocabError(f"{path}:{lineno}: field '{key}' must be a string, got {type(value).__name__}")
        parts.append(value)
    return "".join(parts)


def iter_corpus(paths: Iterable[os.PathLike | str]) -> Iterator[Record]:
    """Stream the texts of corpus files: JSONL records (`text`, or `source` + `target`; optional `category`) or
    plain text in blocks of lines."""
    for p in paths:
        path = Path(p)
        if is_jsonl(path, TEXT_KEYS):
            for lineno, line, nbytes in iter_lines(path):
                if not line.strip():
                    continue
                obj = parse_json_line(line, path, lineno)
                text = _record_text(obj, path, lineno)
                category = obj.get("category")
                if category is not None and not isinstance(category, str):
                    category = str(category)
                yield Record(text, category, path, lineno, nbytes)
        else:
            block: list[str] = []
            start, size = 1, 0
            for lineno, line, nbytes in iter_lines(path):
                if not block:
                    start = lineno
                block.append(line)
                size += nbytes
                if len(block) >= PLAIN_BLOCK_LINES:
                    yield Record("".join(block), None, path, start, size)
                    block, size = [], 0
            if block:
                yield Record("".join(block), None, path, start, size)
