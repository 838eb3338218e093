"""Editing a Hugging Face fast tokenizer (`tokenizer.json`, byte-level BPE: Llama-3, Qwen, GPT-2 style).

In a Hugging Face BPE a token is only ever produced through an explicit merge, so adding a piece means adding the
vocabulary entry AND a merge that builds it from two tokens BPE already produces on the piece's text (with the
intermediate tokens it needs when the piece splits into more than two). New merges go to the end of the merge list:
BPE applies every old merge first, so text without a new piece tokenizes exactly as before and no text gets more
tokens (same argument as for the SentencePiece scores).

Pruning removes vocabulary entries and every merge that uses or produces a removed token, and renumbers the ids in
the original order; added (special) tokens are renumbered everywhere they are mentioned (added_tokens, the post
processor's templates, padding).

Added tokens whose ids follow the model's vocabulary (Llama-3's 256 specials at 128000-128255) are also entered into
the model's vocabulary at their ids before expanding: the `tokenizers` library numbers added tokens that are not in
the model vocabulary after its *size*, so growing the vocabulary would otherwise shift every special token.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from colossal_shear.core.errors import VocabError
from colossal_shear.vocab.bpe import RankBPE, make_reachable
from colossal_shear.vocab.common import ExpandResult, copy_configs, read_json, write_json


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, used by every byte-level BPE."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_level(text: str) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in text.encode("utf-8"))


def _char_starts(piece: str) -> set[int]:
    """Offsets in a byte-level string where a UTF-8 character starts (bytes that are not 10xxxxxx)."""
    inv = {c: b for b, c in bytes_to_unicode().items()}
    return {k for k, ch in enumerate(piece) if (inv[ch] & 0xC0) != 0x80} | {len(piece)}


def _has_byte_level(node) -> bool:
    if not node:
        return False
    if node.get("type") == "ByteLevel":
        return True
    for key in ("pretokenizers", "decoders", "processors"):
        if any(_has_byte_level(n) for n in node.get(key, []) or []):
            return True
    return False


def _remap_ids(node, id_map: dict[int, int]) -> None:
    """Renumber ids inside post-processor templates (special_tokens[*].ids), wherever they are nested."""
    if isinstance(node, dict):
        st = node.get("special_tokens")
        if isinstance(st, dict):
            for entry in st.values():
                if isinstance(entry, dict) and isinstance(entry.get("ids"), list):
                    entry["ids"] = [id_map[i] for i in entry["ids"]]
        for key, value in node.items():
            if key != "special_tokens":
                _remap_ids(value, id_map)
    elif isinstance(node, list):
        for value in node:
            _remap_ids(value, id_map)


class HFFastVocab:
    kind = "hf_fast"

    def __init__(self, source_dir: Path):
        self.source_dir = Path(source_dir)
        path = self.source_dir / "tokenizer.json"
        self.data = read_json(path, "tokenizer.json")
        model = self.data.get("model") or {}
        if model.get("type") != "BPE":
            raise VocabError(f"{path}: model type {model.get('type')!r} is not supported; only BPE tokenizers")
        if not (_has_byte_level(self.data.get("pre_tokenizer")) and _has_byte_level(self.data.get("decoder"))):
            raise VocabError(
                f"{path}: only byte-level BPE tokenizer.json files are supported (Llama-3, Qwen, GPT-2 style); "
                "for a SentencePiece-style tokenizer provide its tokenizer.model"
            )
        if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            raise VocabError(f"{path}: BPE with continuing_subword_prefix / end_of_word_suffix is not supported")
        self.vocab: dict[str, int] = dict(model["vocab"])
        raw = model.get("merges", [])
        self._merges_as_strings = bool(raw) and isinstance(raw[0], str)
        self.merges: list[tuple[str, str]] = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in raw]
        self.added: list[dict] = [dict(t) for t in self.data.get("added_tokens", [])]
        self._check_ids()
        self.source_size = len(self)
        self._tk = None

    def _check_ids(self) -> None:
        ids = set(self.vocab.values()) | {t["id"] for t in self.added}
        n = max(ids) + 1 if ids else 0
        if len(ids) != n:
            raise VocabError(f"{self.source_dir / 'tokenizer.json'}: token ids are not contiguous (0..{n - 1})")

    def _tokenizer(self):
        if self._tk is None:
            from tokenizers import Tokenizer

            self._tk = Tokenizer.from_str(json.dumps(self.data))
        return self._tk

    def __len__(self) -> int:
        return max(max(self.vocab.values(), default=-1), max((t["id"] for t in self.added), default=-1)) + 1

    def pieces(self) -> list[str]:
        out = [""] * len(self)
        for tok, i in self.vocab.items():
            out[i] = tok
        for t in self.added:
            out[t["id"]] = t["content"]
        return out

    def piece_set(self) -> set[str]:
        return set(self.vocab) | {t["content"] for t in self.added}

    def describe(self) -> str:
        return f"byte-level BPE (tokenizer.json), {len(self)} tokens"

    # -- pieces ----------------------------------------------------------------------------------------------------
    def to_internal(self, text: str) -> tuple[str | None, str | None]:
        """The piece in byte-level form; invalid when the pre-tokenizer splits it (BPE could never produce it)."""
        tk = self._tokenizer()
        if tk.normalizer is not None:
            text = tk.normalizer.normalize_str(text)
        if tk.pre_tokenizer is not None:
            parts = tk.pre_tokenizer.pre_tokenize_str(text)
            if len(parts) != 1:
                return None, f"the pre-tokenizer splits it into {len(parts)} parts, so BPE can never produce it"
        return byte_level(text), None

    def is_present(self, internal: str, text: str | None = None) -> bool:
        return internal in self.vocab

    def always_keep_ids(self) -> set[int]:
        keep = {t["id"] for t in self.added}
        base = set(bytes_to_unicode().values())
        keep |= {i for tok, i in self.vocab.items() if tok in base}
        unk = self.data["model"].get("unk_token")
        if unk is not None and unk in self.vocab:
            keep.add(self.vocab[unk])
        return keep

    def _ranks(self) -> dict[tuple[str, str], int]:
        return {m: r for r, m in enumerate(self.merges)}

    def derivation_closure(self, ids: set[int]) -> set[int]:
        bpe = RankBPE(self._ranks())
        inv = {i: t for t, i in self.vocab.items()}
        out: set[int] = set()
        for i in ids:
            tok = inv.get(i)
            if tok is None or len(tok) < 2:
                continue
            trace: list[str] = []
            bpe.segment(tok, trace)
            out.update(self.vocab[t] for t in trace if t in self.vocab)
        return out

    # -- editing ---------------------------------------------------------------------------------------------------
    def prune(self, keep: set[int]) -> dict[int, int]:
        kept = sorted(keep)
        id_map = {o: n for n, o in enumerate(kept)}
        self.vocab = {tok: id_map[i] for tok, i in self.vocab.items() if i in id_map}
        self.merges = [(a, b) for a, b in self.merges if a in self.vocab and b in self.vocab and a + b in self.vocab]
        self.added = [dict(t, id=id_map[t["id"]]) for t in self.added if t["id"] in id_map]
        if self.data.get("post_processor"):
            _remap_ids(self.data["post_processor"], id_map)
        padding = self.data.get("padding")
        if isinstance(padding, dict) and isinstance(padding.get("pad_id"), int) and padding["pad_id"] in id_map:
            padding["pad_id"] = id_map[padding["pad_id"]]
        self._sync()
        return id_map

    def expand(self, pieces: list[str], add_intermediates: bool = True) -> ExpandResult:
        """Append vocabulary entries for `pieces` (byte-level strings, best first) and the merges that build them."""
        if not pieces:
            return ExpandResult(first_new_id=len(self))
        for t in self.added:  # see the module docstring
            self.vocab.setdefault(t["content"], t["id"])
        next_id = len(self)
        res = ExpandResult(first_new_id=next_id)
        for piece in pieces:
            self.vocab[piece] = next_id
            next_id += 1
        res.added = list(pieces)
        ranks = self._ranks()
        bpe = RankBPE(ranks)

        def add_link(left: str, right: str, final: bool) -> None:
            nonlocal next_id
            merged = left + right
            if merged not in self.vocab:
                self.vocab[merged] = next_id
                next_id += 1
                res.intermediates.append(merged)
            ranks[(left, right)] = len(self.merges)
            self.merges.append((left, right))

        for piece in pieces:
            if not add_intermediates:
                seg = bpe.segment(piece)
                if len(seg) == 2:
                    add_link(seg[0], seg[1], True)
                else:
                    res.unreachable.append(piece)
                continue
            make_reachable(piece, bpe, add_link, self.vocab.__contains__, _char_starts(piece))
        self._sync()
        return res

    def _sync(self) -> None:
        model = self.data["model"]
        model["vocab"] = dict(sorted(self.vocab.items(), key=lambda kv: kv[1]))
        if self._merges_as_strings:
            model["merges"] = [f"{a} {b}" for a, b in self.merges]
        else:
            model["merges"] = [list(m) for m in self.merges]
        self.data["added_tokens"] = self.added
        self._tk = None

    # -- writing ---------------------------------------------------------------------------------------------------
    def save(self, tmp: Path, id_map: dict[int, int] | None) -> None:
        from tokenizers import Tokenizer

        text = json.dumps(self.data, ensure_ascii=False)
        try:
            tk = Tokenizer.from_str(text)
        except Exception as e:  # pragma: no cover - would be a bug in the edit above
            raise VocabError(f"internal error: the edited tokenizer.json does not load: {e}") from e
        for t in self.added:
            if tk.token_to_id(t["content"]) != t["id"]:  # pragma: no cover - see the module docstring
                raise VocabError(f"internal error: added token {t['content']!r} would not keep id {t['id']}")
        with open(tmp / "tokenizer.json", "w", encoding="utf-8") as f:
            f.write(json.dumps(self.data, ensure_ascii=False, indent=2))
        copy_configs(self.source_dir, tmp, id_map)
        if (self.source_dir / "vocab.json").exists():  # slow GPT-2 style files, kept in step with tokenizer.json
            write_json(tmp / "vocab.json", self.data["model"]["vocab"], indent=None)
        if (self.source_dir / "merges.txt").exists():
            with open(tmp / "merges.txt", "w", encoding="utf-8") as f:
                f.write("#version: 0.2\n")
                f.writelines(f"{a} {b}\n" for a, b in self.merges)

    def encoder_spec(self, directory: Path) -> tuple[str, str]:
        return ("tokenizers", str(Path(directory) / "tokenizer.json"))
