"""The report `init_tokenizer.py` prints at the end (and writes as `vocab_report.json` beside the tokenizer)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class PieceStats:
    requested: int = 0  # candidates read from --expand_tokens_file
    learned_considered: int = 0  # candidates taken from the trained model for --learn_from_corpus
    learned_added: int = 0
    added: int = 0  # new pieces the user asked for (file + learned)
    intermediates: int = 0  # pieces added only so that BPE can build requested ones
    duplicates: int = 0
    present: int = 0
    rejected_empty: int = 0
    rejected_whitespace: int = 0
    rejected_invalid: int = 0
    unreachable: int = 0  # only with --no_intermediate_pieces
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def rejected(self) -> int:
        return self.rejected_empty + self.rejected_whitespace + self.rejected_invalid


@dataclass
class PruneStats:
    records: int = 0
    chars: int = 0
    tokens: int = 0
    used: int = 0  # ordinary pieces seen at least once
    kept_frequency: int = 0
    kept_always: int = 0
    kept_intermediate: int = 0
    removed: int = 0
    keep_top_k: int | None = None
    min_count: int | None = None


@dataclass
class EvalRow:
    category: str
    records: int
    chars: int
    tokens_before: int
    tokens_after: int

    @property
    def tpc_before(self) -> float:
        return self.tokens_before / self.chars if self.chars else 0.0

    @property
    def tpc_after(self) -> float:
        return self.tokens_after / self.chars if self.chars else 0.0


@dataclass
class TokenizerReport:
    source: str
    target: str
    kind: str
    vocab_before: int
    vocab_after: int = 0
    pieces: PieceStats | None = None
    prune: PruneStats | None = None
    eval_files: list[str] = field(default_factory=list)
    eval: list[EvalRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        d = asdict(self)
        d["eval"] = [
            dict(asdict(r), tokens_per_char_before=r.tpc_before, tokens_per_char_after=r.tpc_after) for r in self.eval
        ]
        return d

    def format(self) -> str:
        lines = [
            f"Vocabulary adaptation: {self.source} -> {self.target} ({self.kind})",
            f"  vocabulary size        before {self.vocab_before:>9,}   after {self.vocab_after:>9,}"
            f"   ({self.vocab_after - self.vocab_before:+,})",
        ]
        if self.prune is not None:
            p = self.prune
            crit = []
            if p.keep_top_k is not None:
                crit.append(f"top {p.keep_top_k:,}")
            if p.min_count is not None:
                crit.append(f"count >= {p.min_count:,}")
            lines += [
                f"  pruning corpus         {p.records:,} records, {p.chars:,} characters, {p.tokens:,} tokens",
                f"  pieces used            {p.used:,}   kept by frequency {p.kept_frequency:,}"
                f" ({', '.join(crit) or 'every used piece'})",
                f"  always kept            {p.kept_always:,} (control, unknown, byte-fallback, special)",
                f"  kept for BPE           {p.kept_intermediate:,} (intermediates of kept pieces)",
                f"  removed                {p.removed:,}",
            ]
        if self.pieces is not None:
            s = self.pieces
            src = []
            if s.requested:
                src.append(f"{s.requested:,} from the file")
            if s.learned_considered:
                src.append(f"{s.learned_considered:,} learned candidates")
            lines += [
                f"  pieces considered      {s.requested + s.learned_considered:,} ({', '.join(src) or 'none'})",
                f"  added                  {s.added:,}"
                + (f" (learned {s.learned_added:,})" if s.learned_considered else ""),
                f"  added as intermediates {s.intermediates:,} (so that BPE can build the pieces above)",
                f"  skipped: duplicates    {s.duplicates:,}",
                f"  skipped: present       {s.present:,}",
                f"  rejected               {s.rejected:,} (empty {s.rejected_empty:,}, whitespace-only "
                f"{s.rejected_whitespace:,}, invalid {s.rejected_invalid:,})",
            ]
            if s.unreachable:
                lines.append(
                    f"  unreachable            {s.unreachable:,} (BPE never produces them: --no_intermediate_pieces)"
                )
            for kind, examples in s.examples.items():
                lines.append(f"    e.g. {kind}: " + "; ".join(examples[:3]))
        if self.eval:
            lines.append(f"  tokens per character on {', '.join(self.eval_files)}")
            lines.append(f"    {'category':<12} {'records':>8} {'chars':>10} {'before':>8} {'after':>8} {'ratio':>7}")
            for r in self.eval:
                ratio = r.tokens_after / r.tokens_before if r.tokens_before else float("nan")
                lines.append(
                    f"    {r.category:<12} {r.records:>8,} {r.chars:>10,} {r.tpc_before:>8.3f} {r.tpc_after:>8.3f} "
                    f"{ratio:>6.3f}x"
                )
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)
