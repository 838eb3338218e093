"""Editing a SentencePiece BPE model (`tokenizer.model`, LLaMA-2 / Mistral style) through its ModelProto.

Expansion appends NORMAL pieces; existing pieces and ids are untouched. Pruning keeps a subset of pieces in their
original order. Afterwards the Hugging Face files are regenerated from the new `tokenizer.model` with the source's
`tokenizer_config.json` (so `AutoTokenizer` converts it exactly as it converted the source) and saved.

Scores of new pieces. In SentencePiece BPE the adjacent pair whose concatenation is the highest-scoring piece merges
first. Colossal-LLaMA-2 gave every new piece score 0, above every existing piece (LLaMA's scores run from 0 down to
about -32,000, and -1e9 for whitespace runs), so a new piece could be merged before the merges the model was
trained with and change how already well-covered text is split. Here every new piece scores strictly below every
existing piece, in the order given (best first): BPE then performs every merge the old model would, reaches the old
segmentation, and only then applies new merges. Consequences: text without a new piece tokenizes exactly as before,
and no text ever gets more tokens than before (new merges only join tokens). Scores are float32 in the proto, so
when `min - k` is no longer representable (near -1e9 the spacing is 64) the next representable float is used.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from colossal_shear.core.errors import VocabError
from colossal_shear.vocab.bpe import ScoreBPE, make_reachable
from colossal_shear.vocab.common import ExpandResult, copy_configs, source_added_tokens

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
ALWAYS_KEEP_TYPES = (UNKNOWN, CONTROL, USER_DEFINED, BYTE)
# `sentencepiece` (0.2.x, measured) refuses to load a model holding a longer piece: "INTERNAL: piece is too long"
MAX_PIECE_BYTES = 7999


def _pb2():
    from sentencepiece import sentencepiece_model_pb2

    return sentencepiece_model_pb2


def load_proto(path: Path):
    proto = _pb2().ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except OSError as e:
        raise VocabError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # protobuf's DecodeError
        raise VocabError(f"{path} is not a SentencePiece model ({e})") from None
    if len(proto.pieces) == 0:
        raise VocabError(f"{path} is not a SentencePiece model (no pieces)")
    return proto


def scores_below(start: float):
    """Strictly decreasing float32 scores below `start`: start-1, start-2, ... (next float when not representable)."""
    prev = np.float32(start)
    k = 0
    while True:
        k += 1
        cand = np.float32(float(start) - k)
        if not cand < prev:
            cand = np.nextafter(prev, np.float32(-np.inf), dtype=np.float32)
        prev = cand
        yield float(cand)


class SentencePieceVocab:
    kind = "sentencepiece"

    def __init__(self, source_dir: Path):
        self.source_dir = Path(source_dir)
        self.proto = load_proto(self.source_dir / "tokenizer.model")
        if self.proto.trainer_spec.model_type != _pb2().TrainerSpec.BPE:
            name = _pb2().TrainerSpec.ModelType.Name(self.proto.trainer_spec.model_type)
            raise VocabError(
                f"{self.source_dir / 'tokenizer.model'} is a SentencePiece {name} model; only BPE models "
                "(LLaMA / Mistral style) are supported"
            )
        self._fold_added_tokens()
        self.source_size = len(self.proto.pieces)
        self._normalizer = None

    # -- reading -------------------------------------------------------------------------------------------------
    def _fold_added_tokens(self) -> None:
        """Added tokens that live past the end of the SentencePiece vocabulary (e.g. a `<pad>` at 32000) become
        pieces of the model at their ids (CONTROL when special, USER_DEFINED otherwise): new pieces can then be
        appended without moving them, and `sentencepiece` itself knows them."""
        n = len(self.proto.pieces)
        extra = {i: t for i, t in source_added_tokens(self.source_dir).items() if i >= n}
        for expected, i in enumerate(sorted(extra), start=n):
            if i != expected:
                raise VocabError(
                    f"{self.source_dir}: added token id {i} leaves a gap after the SentencePiece vocabulary "
                    f"({n} pieces); cannot append pieces without moving it"
                )
            tok = extra[i]
            p = self.proto.pieces.add()
            p.piece = tok["content"]
            p.score = 0.0
            p.type = CONTROL if tok.get("special", False) else USER_DEFINED

    def __len__(self) -> int:
        return len(self.proto.pieces)

    def pieces(self) -> list[str]:
        return [p.piece for p in self.proto.pieces]

    def piece_set(self) -> set[str]:
        return {p.piece for p in self.proto.pieces}

    def normal_scores(self) -> dict[str, float]:
        return {p.piece: p.score for p in self.proto.pieces if p.type == NORMAL}

    def describe(self) -> str:
        return f"SentencePiece BPE, {len(self)} pieces"

    # -- pieces ----------------------------------------------------------------------------------------------------
    def to_internal(self, text: str) -> tuple[str | None, str | None]:
        """The piece as the model sees it: normalised like input text (without the dummy prefix), spaces as '▁'."""
        if self._normalizer is None:
            import sentencepiece as spm

            self._normalizer = spm.SentencePieceNormalizer(
                model_proto=self.proto.SerializeToString(),
                add_dummy_prefix=False,
                escape_whitespaces=True,
                remove_extra_whitespaces=False,
            )
        internal = self._normalizer.normalize(text)
        if not internal:
            return None, "empty after the tokenizer's normalisation"
        size = len(internal.encode("utf-8"))
        if size > MAX_PIECE_BYTES:
            return (
                None,
                f"{size:,} bytes in UTF-8: `sentencepiece` loads no model with a piece over {MAX_PIECE_BYTES:,}",
            )
        return internal, None

    def always_keep_ids(self) -> set[int]:
        keep = {i for i, p in enumerate(self.proto.pieces) if p.type in ALWAYS_KEEP_TYPES}
        if not self.proto.trainer_spec.byte_fallback:
            # without byte fallback a dropped character becomes <unk>: keep every single character
            keep |= {i for i, p in enumerate(self.proto.pieces) if p.type == NORMAL and len(p.piece) == 1}
        return keep

    def derivation_closure(self, ids: set[int]) -> set[int]:
        """Ids of the pieces BPE passes through to build each of `ids`: its intermediates and its characters
        (the Hugging Face BPE turns an unknown character into bytes before merging, `sentencepiece` does not, so a
        kept piece keeps its characters for the two to agree)."""
        bpe = ScoreBPE(self.normal_scores())
        index = {p.piece: i for i, p in enumerate(self.proto.pieces)}
        out: set[int] = set()
        for i in ids:
            p = self.proto.pieces[i]
            if p.type != NORMAL or len(p.piece) < 2:
                continue
            trace: list[str] = list(p.piece)
            bpe.segment(p.piece, trace)
            out.update(index[t] for t in trace if t in index)
        return out

    # -- editing ---------------------------------------------------------------------------------------------------
    def prune(self, keep: set[int]) -> dict[int, int]:
        old = list(self.proto.pieces)
        kept = sorted(keep)
        id_map = {o: n for n, o in enumerate(kept)}
        new = copy.deepcopy(self.proto)
        del new.pieces[:]
        new.pieces.extend(old[i] for i in kept)
        spec = new.trainer_spec
        for name in ("unk_id", "bos_id", "eos_id", "pad_id"):
            v = getattr(spec, name)
            if v >= 0:
                if v not in id_map:
                    raise VocabError(f"internal error: pruning removed the {name[:-3]} piece")  # pragma: no cover
                setattr(spec, name, id_map[v])
        spec.vocab_size = len(kept)
        self.proto = new
        return id_map

    def expand(self, pieces: list[str], add_intermediates: bool = True) -> ExpandResult:
        """Append `pieces` (internal strings, best first) as NORMAL pieces scored below every existing piece, then
        make each one reachable by BPE (adding the intermediate pieces it needs, see `bpe.make_reachable`)."""
        res = ExpandResult(first_new_id=len(self.proto.pieces))
        existing = [p.score for p in self.proto.pieces if p.type == NORMAL]
        score_gen = scores_below(min(existing) if existing else 0.0)
        scores = self.normal_scores()
        order: list[tuple[str, float]] = []
        for piece in pieces:
            s = next(score_gen)
            scores[piece] = s
            order.append((piece, s))
        res.added = list(pieces)

        bpe = ScoreBPE(scores)
        inter: list[tuple[str, float]] = []
        known = self.piece_set()  # every type: a piece string may appear once only

        def add_link(left: str, right: str, final: bool) -> None:
            merged = left + right
            if merged not in scores and merged not in known:
                s = next(score_gen)
                scores[merged] = s
                inter.append((merged, s))

        for piece in pieces:
            if len(piece) > 1:
                # `sentencepiece` merges characters it does not know, the Hugging Face BPE turns them into bytes
                # first (byte fallback) and cannot: every character of a new piece becomes a piece (whatever
                # add_intermediates says), or the two tokenizers would disagree.
                for ch in piece:
                    if ch not in scores and ch not in known:
                        add_link(ch, "", False)
            if bpe.segment(piece) == [piece]:
                continue
            if add_intermediates:
                make_reachable(piece, bpe, add_link)
            else:
                res.unreachable.append(piece)
        res.intermediates = [p for p, _ in inter]
        for piece, s in order + inter:
            sp = self.proto.pieces.add()
            sp.piece = piece
            sp.score = s
            sp.type = NORMAL
        self.proto.trainer_spec.vocab_size = len(self.proto.pieces)
        return res

    # -- writing ---------------------------------------------------------------------------------------------------
    def save(self, tmp: Path, id_map: dict[int, int] | None) -> None:
        """Write tokenizer.model, then the Hugging Face files converted from it with the source's settings."""
        from transformers import AutoTokenizer, LlamaTokenizer

        (tmp / "tokenizer.model").write_bytes(self.proto.SerializeToString())
        copy_configs(self.source_dir, tmp, id_map)
        if not (tmp / "tokenizer_config.json").exists():
            # a bare tokenizer.model: describe it the LLaMA way (legacy=True matches `sentencepiece` exactly)
            LlamaTokenizer(vocab_file=str(tmp / "tokenizer.model"), legacy=True).save_pretrained(tmp)
        try:
            fast = AutoTokenizer.from_pretrained(tmp)  # no tokenizer.json here: converted from tokenizer.model
        except Exception as e:
            raise VocabError(f"the new tokenizer does not load with AutoTokenizer: {e}") from e
        fast.save_pretrained(tmp)

    def encoder_spec(self, directory: Path) -> tuple[str, str]:
        return ("sentencepiece", str(Path(directory) / "tokenizer.model"))
