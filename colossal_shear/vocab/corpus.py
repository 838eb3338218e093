"""Reading the text inputs (corpora, piece lists, evaluation files) with errors that name the file and line.

The reading itself is the package's one record reader, `colossal_shear.data.records` (its docstring has the rule
for `text` vs `source`/`target` and how JSONL and plain-text files are told apart; gzip is read when the name ends
in `.gz`); this module turns its errors into `VocabError`, which the CLIs print as one line.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from colossal_shear.core.errors import VocabError
from colossal_shear.data import records
from colossal_shear.data.records import CorpusText, DataPrepError


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


@contextlib.contextmanager
def _as_vocab_error() -> Iterator[None]:
    try:
        yield
    except DataPrepError as e:
        raise VocabError(str(e)) from None


def iter_lines(path: Path) -> Iterator[tuple[int, str, int]]:
    """(line number, decoded line with its newline, size in bytes)."""
    with _as_vocab_error():
        yield from records.iter_lines(path)


def is_jsonl(path: Path, keys: tuple[str, ...]) -> bool:
    with _as_vocab_error():
        return records.is_jsonl(path, keys)


def parse_json_line(line: str, path: Path, lineno: int) -> dict:
    """The JSON object on one non-blank line."""
    with _as_vocab_error():
        return records.parse_json_object(line, str(path), lineno)


def iter_corpus(paths: Iterable[os.PathLike | str]) -> Iterator[CorpusText]:
    """Stream the texts of corpus files (`records.iter_texts`: a JSONL record's source + target, or a block of
    plain-text lines)."""
    for p in paths:
        with _as_vocab_error():
            yield from records.iter_texts(p)
