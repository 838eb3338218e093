"""`init_tokenizer(config)`: expand and/or prune a tokenizer, write it atomically, check it, report.

Order of work: validate flags and inputs (nothing is computed before every input file is known to be readable and
the target is known to be free), prune (count frequencies, keep, renumber), expand (pieces from the file, then
learned ones), then build the target in a temporary sibling directory, check that it loads with `AutoTokenizer`
(and `sentencepiece`), that it round-trips and agrees with `sentencepiece` wherever the source did, measure tokens
per character, and only then rename it into place.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from colossal_shear.core.constants import VOCAB_REPORT_FILE
from colossal_shear.core.errors import VocabError
from colossal_shear.core.fsutil import atomic_dir, check_target
from colossal_shear.core.logger import get_logger
from colossal_shear.vocab.common import write_json
from colossal_shear.vocab.config import TokenizerConfig
from colossal_shear.vocab.corpus import check_readable
from colossal_shear.vocab.frequencies import CorpusCounts, count_tokens
from colossal_shear.vocab.hf_fast_edit import HFFastVocab
from colossal_shear.vocab.id_map import write_id_map
from colossal_shear.vocab.learn import train_pieces
from colossal_shear.vocab.pieces import Candidate, Selection, read_pieces, select_pieces
from colossal_shear.vocab.report import EvalRow, PieceStats, PruneStats, TokenizerReport
from colossal_shear.vocab.sentencepiece_edit import SentencePieceVocab

log = get_logger(__name__)

# Texts every produced tokenizer must round-trip (and, for SentencePiece, encode exactly like `sentencepiece`).
PROBES = (
    "The quick brown fox jumps over the lazy dog. It's 3:45 p.m., isn't it?",
    "人工智能是计算机科学的一个分支，它企图了解智能的实质。",
    "Emoji: 👋🏽 🎉 café naïve — “quoted” ½ ∑",
    "def f(x):\n\treturn {'a': x ** 2}  # comment\n\nprint(f(3))\n",
    "  leading spaces,\ttabs\t\tand\n\n\nnewlines   and trailing  ",
    "混合 mixed 文本 with 中英文 and numbers 12345.67",
)


def open_tokenizer(directory: Path) -> SentencePieceVocab | HFFastVocab:
    """The editor for a tokenizer directory: SentencePiece when it has a tokenizer.model, else tokenizer.json."""
    d = Path(directory)
    if not d.exists():
        raise VocabError(f"source tokenizer directory not found: {d}")
    if not d.is_dir():
        raise VocabError(f"source tokenizer path is not a directory: {d}")
    if (d / "tokenizer.model").exists():
        return SentencePieceVocab(d)
    if (d / "tokenizer.json").exists():
        return HFFastVocab(d)
    raise VocabError(
        f"no tokenizer in {d}: expected tokenizer.model (SentencePiece) or tokenizer.json (Hugging Face fast)"
    )


def select_kept(vocab, counts: CorpusCounts, keep_top_k: int | None, min_count: int | None):
    """Kept ids: always-kept pieces, used pieces (top K by count, ties to the lower id; or count >= C), and the
    intermediate pieces their BPE derivations pass through."""
    n = len(vocab)
    c = counts.counts[:n]
    always = vocab.always_keep_ids()
    ordinary = np.ones(n, dtype=bool)
    ordinary[sorted(always)] = False
    used = ordinary & (c > 0)
    cand = np.nonzero(ordinary & (c >= max(1, min_count or 1)))[0]
    if keep_top_k is not None:
        cand = cand[np.lexsort((cand, -c[cand]))][:keep_top_k]
    freq = set(int(i) for i in cand)
    closure = vocab.derivation_closure(freq) - freq - always
    keep = always | freq | closure
    stats = PruneStats(
        records=counts.records,
        chars=counts.chars,
        tokens=counts.tokens,
        used=int(used.sum()),
        kept_frequency=len(freq),
        kept_always=len(always),
        kept_intermediate=len(closure),
        removed=n - len(keep),
        keep_top_k=keep_top_k,
        min_count=min_count,
    )
    return keep, stats


def _candidates(texts, origin: str) -> list[Candidate]:
    return [Candidate(t, origin) for t in texts]


def _learn(cfg: TokenizerConfig, vocab, sel_seen: set[str], present_texts: set[str]) -> Selection:
    """Train on the corpus and keep the first N pieces the tokenizer lacks; retry once, larger, if short."""
    n = cfg.num_new_pieces
    split_digits = True
    if isinstance(vocab, SentencePieceVocab):
        split_digits = vocab.proto.trainer_spec.split_digits
    size = 2 * n + 500
    best = None
    for _ in range(2):
        texts = train_pieces(cfg.learn_from_corpus, size, split_digits, cfg.num_workers)
        sel = select_pieces(
            _candidates(texts, "learned"),
            vocab.to_internal,
            _present_fn(vocab),
            limit=n,
            seen=set(sel_seen),
            present_texts=present_texts,
        )
        best = sel
        if len(sel.to_add) >= n:
            break
        size *= 2
    return best


def _present_fn(vocab):
    pieces = vocab.piece_set()
    return pieces.__contains__


def _eval_rows(paths, before_spec, after_spec, n_before, n_after, cfg) -> list[EvalRow]:
    before = count_tokens(paths, before_spec, n_before, cfg.num_workers, cfg.progress, "eval (before)")
    after = count_tokens(paths, after_spec, n_after, cfg.num_workers, cfg.progress, "eval (after)")
    rows = []
    cats = sorted(k for k in before.per_category if k is not None)
    if cats:
        for k in cats:
            b, a = before.per_category[k], after.per_category[k]
            rows.append(EvalRow(k, b[0], b[1], b[2], a[2]))
    rows.append(EvalRow("all", before.records, before.chars, before.tokens, after.tokens))
    return rows


def _probe_failures(directory: Path, kind: str, texts) -> set[tuple[str, int]]:
    """(check, probe index) pairs that fail for the tokenizer in `directory`."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(directory)
    except Exception as e:
        raise VocabError(f"{directory}: does not load with AutoTokenizer.from_pretrained: {e}") from e
    sp = None
    if kind == "sentencepiece":
        import sentencepiece as spm

        try:
            sp = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
        except Exception as e:
            raise VocabError(f"{directory}: tokenizer.model does not load with sentencepiece: {e}") from e
    bad = set()
    for i, t in enumerate(texts):
        ids = tok.encode(t, add_special_tokens=False)
        if tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) != t:
            bad.add(("AutoTokenizer round trip", i))
        if sp is not None:
            sp_ids = sp.encode(t)
            if sp.decode(sp_ids) != t:
                bad.add(("sentencepiece round trip", i))
            if sp_ids != ids:
                bad.add(("AutoTokenizer == sentencepiece", i))
    return bad


def _verify(tmp: Path, cfg: TokenizerConfig, vocab, report: TokenizerReport, extra_probes: list[str]) -> None:
    """Load the result both ways and compare with the source on the probes: a check the source passes and the
    result fails is a bug here, and stops publication; one the source also fails is only noted."""
    from transformers import AutoTokenizer

    texts = list(PROBES) + extra_probes
    after = _probe_failures(tmp, vocab.kind, texts)
    if after:
        before = _probe_failures(Path(cfg.source_tokenizer_dir), vocab.kind, texts)
        new = after - before
        if new:
            check, i = sorted(new)[0]
            raise VocabError(f"internal error: the new tokenizer fails '{check}' on {texts[i]!r}, the source does not")
        for check in sorted({c for c, _ in after}):
            report.notes.append(f"'{check}' fails on some probe texts, as it does for the source tokenizer")
    n = len(AutoTokenizer.from_pretrained(tmp))
    if n != len(vocab):
        raise VocabError(f"internal error: AutoTokenizer sees {n} tokens, expected {len(vocab)}")


def init_tokenizer(cfg: TokenizerConfig) -> TokenizerReport:
    """Expand and/or prune `cfg.source_tokenizer_dir` into `cfg.target_tokenizer_dir`; returns the report (also
    written as vocab_report.json beside the tokenizer, with id_map.json)."""
    source, target = _check_inputs(cfg)
    vocab = open_tokenizer(source)
    file_candidates = read_pieces(Path(cfg.expand_tokens_file)) if cfg.expand_tokens_file else []
    report = TokenizerReport(str(source), str(target), vocab.describe(), vocab_before=len(vocab))
    source_spec = vocab.encoder_spec(source)
    source_size = len(vocab)
    pruned_ids = _prune(cfg, vocab, source_spec, report)
    added_texts = _expand(cfg, vocab, file_candidates, report) if file_candidates or cfg.learn_from_corpus else []
    report.vocab_after = len(vocab)
    id_map = pruned_ids if pruned_ids is not None else {i: i for i in range(source_size)}
    with atomic_dir(target, cfg.overwrite) as tmp:
        vocab.save(tmp, pruned_ids)
        write_id_map(tmp, id_map)
        _verify(tmp, cfg, vocab, report, [" ".join(added_texts)] if added_texts else [])
        if pruned_ids is None and vocab.pieces()[:source_size] != open_tokenizer(source).pieces():
            raise VocabError("internal error: an existing piece changed its id")  # pragma: no cover
        if cfg.eval_file:
            report.eval_files = [str(p) for p in cfg.eval_file]
            report.eval = _eval_rows(cfg.eval_file, source_spec, vocab.encoder_spec(tmp), source_size, len(vocab), cfg)
        write_json(tmp / VOCAB_REPORT_FILE, report.to_json())
    return report


def _check_inputs(cfg: TokenizerConfig) -> tuple[Path, Path]:
    """The source and target directories, once the flags are valid, the target is free and every input file is
    readable (nothing is computed before)."""
    cfg.validate()
    source = Path(cfg.source_tokenizer_dir)
    target = Path(cfg.target_tokenizer_dir)
    check_target(target, cfg.overwrite, sources=(source,), error=VocabError)
    if cfg.expand_tokens_file:
        check_readable([cfg.expand_tokens_file], "--expand_tokens_file")
    check_readable(cfg.learn_from_corpus, "--learn_from_corpus file")
    check_readable(cfg.prune_corpus, "--prune_corpus file")
    check_readable(cfg.eval_file, "--eval_file")
    return source, target


def _prune(cfg: TokenizerConfig, vocab, source_spec, report: TokenizerReport) -> dict[int, int] | None:
    """`--prune_corpus`: count the source tokens in the corpus, keep the used ones (`select_kept`) and renumber.
    Returns old id -> new id; None without pruning."""
    if not cfg.prune_corpus:
        return None
    counts = count_tokens(cfg.prune_corpus, source_spec, len(vocab), cfg.num_workers, cfg.progress, "counting tokens")
    if counts.records == 0:
        raise VocabError(f"--prune_corpus: no text in {', '.join(map(str, cfg.prune_corpus))}")
    keep, report.prune = select_kept(vocab, counts, cfg.keep_top_k, cfg.min_count)
    return vocab.prune(keep)


def _expand(cfg: TokenizerConfig, vocab, file_candidates: list[Candidate], report: TokenizerReport) -> list[str]:
    """Add the pieces of `--expand_tokens_file`, then those learned from `--learn_from_corpus`. Returns the first
    200 added pieces as plain text (a probe for the checks)."""
    present_texts = {t["content"] for t in getattr(vocab, "added", [])}
    sel = select_pieces(file_candidates, vocab.to_internal, _present_fn(vocab), present_texts=present_texts)
    stats = PieceStats(
        requested=sel.requested,
        duplicates=sel.duplicates,
        present=sel.present,
        rejected_empty=sel.rejected["empty"],
        rejected_whitespace=sel.rejected["whitespace"],
        rejected_invalid=sel.rejected["invalid"],
        examples=dict(sel.examples),
    )
    to_add = list(sel.to_add)
    if cfg.learn_from_corpus:
        to_add += _learned_pieces(cfg, vocab, set(to_add), present_texts, stats, report)
    res = vocab.expand(to_add, cfg.add_intermediates)
    stats.added = len(res.added)
    stats.intermediates = len(res.intermediates)
    stats.unreachable = len(res.unreachable)
    if res.intermediates:
        stats.examples["intermediate"] = res.intermediates[:5]
    report.pieces = stats
    pieces = vocab.pieces()
    return [_piece_text(vocab, p) for p in pieces[res.first_new_id : res.first_new_id + 200]]


def _learned_pieces(cfg, vocab, seen: set[str], present_texts: set[str], stats: PieceStats, report) -> list[str]:
    """The pieces learned from the corpus that the tokenizer (and the file's pieces, `seen`) lack; counted in
    `stats`, a shortfall noted in the report."""
    learned = _learn(cfg, vocab, seen, present_texts)
    stats.learned_considered = learned.requested
    stats.learned_added = len(learned.to_add)
    stats.present += learned.present
    stats.duplicates += learned.duplicates
    stats.rejected_invalid += learned.rejected["invalid"]
    for k, v in learned.examples.items():
        stats.examples.setdefault(f"learned, {k}", v)
    if len(learned.to_add) < cfg.num_new_pieces:
        report.notes.append(
            f"the corpus yielded only {len(learned.to_add)} new pieces of the {cfg.num_new_pieces} asked for"
        )
    return learned.to_add


def _piece_text(vocab, piece: str) -> str:
    """A piece as plain text (for probes): '▁' -> space for SentencePiece, bytes decoded for byte-level BPE."""
    if isinstance(vocab, SentencePieceVocab):
        return piece.replace("\u2581", " ")
    from colossal_shear.vocab.hf_fast_edit import bytes_to_unicode

    inv = {c: b for b, c in bytes_to_unicode().items()}
    try:
        return bytes(inv[c] for c in piece).decode("utf-8", errors="replace")
    except KeyError:
        return piece
