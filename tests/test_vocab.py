"""Vocabulary expansion and pruning on the bundled tokenizers (SentencePiece fixture + a byte-level BPE in the
Llama-3 layout): ids, round trips, loading, special tokens, the no-worse guarantee, the report, bad inputs, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from colossal_shear.bundled import CORPUS_DIR, corpus_records
from colossal_shear.vocab import TokenizerConfig, VocabError, init_tokenizer, read_id_map, sentencepiece_edit
from colossal_shear.vocab.bpe import RankBPE, ScoreBPE
from colossal_shear.vocab.frequencies import count_tokens
from colossal_shear.vocab.hf_fast_edit import byte_level
from colossal_shear.vocab.pieces import MAX_PIECE_CHARS
from colossal_shear.vocab.toy import build_byte_level_tokenizer

ROOT = Path(__file__).resolve().parent.parent
EN, ZH, CODE = (CORPUS_DIR / f"{c}.jsonl" for c in ("en", "zh", "code"))
ROUND_TRIP = [
    "The quick brown fox jumps over the lazy dog.",
    "人工智能是计算机科学的一个分支。深度学习改变了机器学习。",
    "Emoji 👋🏽🎉 and naïve café ½",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    "  two leading spaces,\ttab\t\tand   runs   of spaces \n\n trailing ",
    "混合 mixed 文本, 中英文 numbers 12345 and 人工智能AI",
]
WORDS = ["人工智能", "深度学习", "机器学习", "计算机", "翻译", "自然语言处理", "hello", " tokenizer", "🎉🎉", "知识"]


def texts():
    return [r.get("source", "") + r["target"] for r in corpus_records()]


def cfg(src, dst, **kw) -> TokenizerConfig:
    kw.setdefault("num_workers", 1)
    kw.setdefault("progress", False)
    return TokenizerConfig(source_tokenizer_dir=Path(src), target_tokenizer_dir=Path(dst), **kw)


def write_pieces(path: Path, pieces, jsonl=True) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for p in pieces:
            f.write(json.dumps({"piece": p}, ensure_ascii=False) + "\n" if jsonl else p + "\n")
    return path


def sp(d) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(Path(d) / "tokenizer.model"))


def leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("vocab")


@pytest.fixture(scope="module")
def expanded(tokenizer_dir, work):
    """The fixture tokenizer expanded with WORDS (JSONL)."""
    out = work / "expanded"
    report = init_tokenizer(
        cfg(tokenizer_dir, out, expand_tokens_file=write_pieces(work / "w.jsonl", WORDS), eval_file=[EN, ZH, CODE])
    )
    return out, report


@pytest.fixture(scope="module")
def pruned(tokenizer_dir, work):
    """The fixture tokenizer pruned to the pieces the English corpus uses."""
    out = work / "pruned"
    report = init_tokenizer(cfg(tokenizer_dir, out, prune_corpus=[EN]))
    return out, report


@pytest.fixture(scope="module")
def byte_dir(work):
    return build_byte_level_tokenizer(work / "byte-level")


# ----------------------------------------------------------------------------------------------------------------
# SentencePiece: expansion
# ----------------------------------------------------------------------------------------------------------------


def test_expansion_keeps_every_existing_id(tokenizer_dir, expanded):
    out, report = expanded
    old, new = sp(tokenizer_dir), sp(out)
    n = old.get_piece_size()
    assert [new.id_to_piece(i) for i in range(n)] == [old.id_to_piece(i) for i in range(n)]
    a, b = AutoTokenizer.from_pretrained(tokenizer_dir), AutoTokenizer.from_pretrained(out)
    assert b.convert_ids_to_tokens(list(range(n))) == a.convert_ids_to_tokens(list(range(n)))
    # requested pieces come first, in file order, then the intermediates
    assert [new.id_to_piece(n + i) for i in range(report.pieces.added)] == [w.replace(" ", "\u2581") for w in WORDS]
    assert len(b) == new.get_piece_size() == report.vocab_after == n + report.pieces.added + report.pieces.intermediates


def test_new_pieces_are_produced_by_both_tokenizers(expanded):
    out, _ = expanded
    s, fast = sp(out), AutoTokenizer.from_pretrained(out)
    for w in ["人工智能", "深度学习", "自然语言处理", "🎉🎉"]:
        text = "我们研究" + w + "。"
        pid = s.piece_to_id(w)
        assert pid >= 2048
        assert pid in s.encode(text), (w, s.encode(text, out_type=str))
        assert fast.encode(text, add_special_tokens=False) == s.encode(text)
    assert s.encode("hello tokenizer", out_type=str)[-1] == "\u2581tokenizer"


def test_round_trips_and_agreement(tokenizer_dir, expanded, pruned):
    for d in (tokenizer_dir, expanded[0], pruned[0]):
        s, fast = sp(d), AutoTokenizer.from_pretrained(d)
        for t in ROUND_TRIP:
            ids = s.encode(t)
            assert s.decode(ids) == t
            assert fast.encode(t, add_special_tokens=False) == ids
            assert fast.decode(fast.encode(t), skip_special_tokens=True) == t


def test_settings_and_special_tokens_survive(tokenizer_dir, expanded, pruned):
    src_cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    src = AutoTokenizer.from_pretrained(tokenizer_dir)
    for d in (expanded[0], pruned[0]):
        new_cfg = json.loads((d / "tokenizer_config.json").read_text())
        for k, v in src_cfg.items():
            if k != "added_tokens_decoder":
                assert new_cfg[k] == v, k
        assert [v["content"] for v in new_cfg["added_tokens_decoder"].values()] == ["<unk>", "<s>", "</s>"]
        tok = AutoTokenizer.from_pretrained(d)
        assert tok.special_tokens_map == src.special_tokens_map
        assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
        assert tok("hi").input_ids[0] == 1  # add_bos_token kept
        s = sp(d)
        assert (s.bos_id(), s.eos_id(), s.unk_id()) == (1, 2, 0)
        assert json.loads((d / "special_tokens_map.json").read_text()) == json.loads(
            (tokenizer_dir / "special_tokens_map.json").read_text()
        )


def test_existing_text_never_tokenizes_worse(tokenizer_dir, work, monkeypatch):
    """Pieces that straddle existing merges ('e▁t', ...) with scores below every existing piece: no text gets more
    tokens, and text where no new piece applies is unchanged. With Colossal-LLaMA-2's score 0 the same pieces make
    most texts longer, which shows the check can fail."""
    old = sp(tokenizer_dir)
    corpus = texts()
    pieces = [
        "e\u2581t",
        "d\u2581t",
        "t\u2581t",
        "e\u2581s",
        "n\u2581t",
        "e\u2581a",
        "s\u2581t",
        "e\u2581o",
        "人工智能",
        "ing\u2581the",
        "tion\u2581of",
        "\u2581of\u2581the",
        "();\n",
        "    return",
    ]
    f = write_pieces(work / "straddle.txt", pieces, jsonl=False)

    init_tokenizer(cfg(tokenizer_dir, work / "low", expand_tokens_file=f))
    new = sp(work / "low")
    n_old = old.get_piece_size()
    changed = 0
    for t in corpus:
        a, b = old.encode(t), new.encode(t)
        assert len(b) <= len(a)
        if all(i < n_old for i in b):
            assert a == b
        else:
            changed += 1
    assert changed > 0  # the new pieces are used

    monkeypatch.setattr(sentencepiece_edit, "scores_below", lambda start: iter(lambda: 0.0, 1))
    init_tokenizer(cfg(tokenizer_dir, work / "zero", expand_tokens_file=f))
    zero = sp(work / "zero")
    assert sum(len(zero.encode(t)) > len(old.encode(t)) for t in corpus) > len(corpus) // 4


def test_scores_are_below_every_existing_piece_even_near_minus_1e9():
    gen = sentencepiece_edit.scores_below(-1e9)
    scores = [next(gen) for _ in range(5)]
    assert all(s < -1e9 for s in scores) and scores == sorted(set(scores), reverse=True)
    gen = sentencepiece_edit.scores_below(-1788.0)
    assert [next(gen) for _ in range(3)] == [-1789.0, -1790.0, -1791.0]


def test_reference_bpe_matches_sentencepiece(tokenizer_dir):
    """The planner's Python BPE must be the tokenizer's BPE, or reachability decisions would be wrong."""
    from colossal_shear.vocab.tokenizer import open_tokenizer

    v = open_tokenizer(tokenizer_dir)
    bpe, s = ScoreBPE(v.normal_scores()), sp(tokenizer_dir)
    known = {p for p in v.pieces()}
    checked = 0
    for t in texts()[::7]:
        for line in t.splitlines()[:3]:
            line = line[:80]
            if not line or any(ch not in known for ch in line.replace(" ", "\u2581")):
                continue  # byte fallback happens after BPE; keep to lines of known characters
            assert bpe.segment("\u2581" + line.replace(" ", "\u2581")) == s.encode(line, out_type=str)
            checked += 1
    assert checked > 20


def test_added_token_past_the_sentencepiece_vocabulary_keeps_its_id(tokenizer_dir, tmp_path):
    """A `<pad>` added at 2048 (as many LLaMA fine-tunes have) must stay 2048; new pieces follow it."""
    src = tmp_path / "with-pad"
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.save_pretrained(src)
    assert tok.pad_token_id == 2048
    out = tmp_path / "out"
    init_tokenizer(cfg(src, out, expand_tokens_file=write_pieces(tmp_path / "p.jsonl", ["人工智能"])))
    new = AutoTokenizer.from_pretrained(out)
    assert new.pad_token_id == 2048 and new.pad_token == "<pad>"
    assert sp(out).piece_to_id("<pad>") == 2048
    assert new.convert_tokens_to_ids("人工智能") == 2049
    assert new.encode("a<pad>b", add_special_tokens=False).count(2048) == 1


# ----------------------------------------------------------------------------------------------------------------
# SentencePiece: pruning
# ----------------------------------------------------------------------------------------------------------------


def test_pruning_keeps_order_specials_and_tokenization(tokenizer_dir, pruned):
    out, report = pruned
    id_map = read_id_map(out / "id_map.json")
    olds = sorted(id_map)
    assert [id_map[o] for o in olds] == list(range(len(olds)))  # original relative order
    old, new = sp(tokenizer_dir), sp(out)
    assert new.get_piece_size() == len(olds) == report.vocab_after < old.get_piece_size()
    for i in range(old.get_piece_size()):  # control, unknown and every byte piece kept
        if old.is_control(i) or old.is_unknown(i) or old.is_byte(i):
            assert i in id_map and new.id_to_piece(id_map[i]) == old.id_to_piece(i)
    for o in olds:
        assert new.id_to_piece(id_map[o]) == old.id_to_piece(o)
    en = [r.get("source", "") + r["target"] for r in corpus_records() if r["category"] == "en"]
    for t in en:  # every piece English uses is kept: English tokenizes exactly as before
        assert new.encode(t) == [id_map[i] for i in old.encode(t)]
    zh = [r["target"] for r in corpus_records() if r["category"] == "zh"][:5]
    for t in zh:  # Chinese lost its pieces but still round-trips through byte fallback
        assert new.decode(new.encode(t)) == t
    p = report.prune
    assert p.used == p.kept_frequency and p.removed == old.get_piece_size() - len(olds)
    assert p.kept_always == 3 + 256


def test_keep_top_k_and_min_count(tokenizer_dir, tmp_path):
    from colossal_shear.vocab.tokenizer import open_tokenizer

    v = open_tokenizer(tokenizer_dir)
    counts = count_tokens([EN], v.encoder_spec(tokenizer_dir), len(v), 1, False).counts
    r = init_tokenizer(cfg(tokenizer_dir, tmp_path / "top", prune_corpus=[EN], keep_top_k=100))
    id_map = read_id_map(tmp_path / "top" / "id_map.json")
    assert r.prune.kept_frequency == 100
    ordinary = [i for i in range(len(v)) if v.proto.pieces[i].type == 1]
    top = sorted(ordinary, key=lambda i: (-counts[i], i))[:100]
    assert set(top) <= set(id_map)
    assert len(id_map) == 100 + 259 + r.prune.kept_intermediate
    # the kept pieces still build: text made of top pieces tokenizes as before
    s_old, s_new = sp(tokenizer_dir), sp(tmp_path / "top")
    for t in texts():
        ids = s_old.encode(t)
        if set(ids) <= set(id_map):
            assert s_new.encode(t) == [id_map[i] for i in ids]

    r2 = init_tokenizer(cfg(tokenizer_dir, tmp_path / "min", prune_corpus=[EN], min_count=20))
    assert r2.prune.kept_frequency == sum(1 for i in ordinary if counts[i] >= 20)


def test_prune_plain_text_corpus_and_combined_expand(tokenizer_dir, tmp_path):
    plain = tmp_path / "corpus.txt"
    plain.write_text("\n".join(r["target"] for r in corpus_records() if r["category"] == "code"), encoding="utf-8")
    out = tmp_path / "both"
    r = init_tokenizer(
        cfg(
            tokenizer_dir,
            out,
            prune_corpus=[plain],
            expand_tokens_file=write_pieces(tmp_path / "p.txt", ["人工智能"], jsonl=False),
        )
    )
    s = sp(out)
    id_map = read_id_map(out / "id_map.json")
    assert s.get_piece_size() == len(id_map) + r.pieces.added + r.pieces.intermediates
    assert s.piece_to_id("人工智能") == len(id_map)  # appended after the kept pieces
    assert "人工智能" in s.encode("人工智能", out_type=str)
    assert s.encode("    return x\n") == [id_map[i] for i in sp(tokenizer_dir).encode("    return x\n")]


# ----------------------------------------------------------------------------------------------------------------
# Learning pieces
# ----------------------------------------------------------------------------------------------------------------


def test_learn_from_corpus(tokenizer_dir, tmp_path):
    out = tmp_path / "learned"
    r = init_tokenizer(cfg(tokenizer_dir, out, learn_from_corpus=[ZH], num_new_pieces=40, eval_file=[ZH]))
    assert r.pieces.added == r.pieces.learned_added == 40
    old, new = sp(tokenizer_dir), sp(out)
    old_pieces = {old.id_to_piece(i) for i in range(old.get_piece_size())}
    added = [new.id_to_piece(2048 + i) for i in range(40)]
    assert not set(added) & old_pieces
    assert r.eval[-1].tokens_after < r.eval[-1].tokens_before  # they help on the text they came from


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face fast (byte-level BPE, Llama-3 layout)
# ----------------------------------------------------------------------------------------------------------------


def test_byte_level_expansion(byte_dir, tmp_path):
    out = tmp_path / "bl-exp"
    r = init_tokenizer(cfg(byte_dir, out, expand_tokens_file=write_pieces(tmp_path / "p.jsonl", WORDS + ["12345"])))
    old, new = AutoTokenizer.from_pretrained(byte_dir), AutoTokenizer.from_pretrained(out)
    n = len(old)
    assert new.convert_ids_to_tokens(list(range(n))) == old.convert_ids_to_tokens(list(range(n)))
    assert (new.bos_token_id, new.eos_token_id) == (old.bos_token_id, old.eos_token_id) == (1024, 1025)
    assert new("hi").input_ids[0] == 1024  # the BOS template kept its id
    assert r.pieces.rejected_invalid == 1  # '12345': the pre-tokenizer splits digits in threes
    for w in ["人工智能", "自然语言处理", "hello", " tokenizer"]:
        wid = new.convert_tokens_to_ids(byte_level(w))
        assert wid >= n and wid in new.encode(
            "我们" + w if w[0] != " " and ord(w[0]) > 127 else w, add_special_tokens=False
        )
    for t in ROUND_TRIP:
        assert new.decode(new.encode(t, add_special_tokens=False)) == t
    for t in texts():  # never more tokens; unchanged where no new token is used
        a, b = old.encode(t, add_special_tokens=False), new.encode(t, add_special_tokens=False)
        assert len(b) <= len(a)
        if max(b) < n:
            assert a == b


def test_byte_level_pruning(byte_dir, tmp_path):
    out = tmp_path / "bl-prune"
    r = init_tokenizer(cfg(byte_dir, out, prune_corpus=[EN, CODE]))
    old, new = AutoTokenizer.from_pretrained(byte_dir), AutoTokenizer.from_pretrained(out)
    id_map = read_id_map(out / "id_map.json")
    assert len(new) == len(id_map) == r.vocab_after < len(old)
    for special in ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"):
        assert new.convert_tokens_to_ids(special) == id_map[old.convert_tokens_to_ids(special)]
    assert new.bos_token_id == len(new) - 3
    assert new("hi").input_ids[0] == new.bos_token_id  # post-processor template renumbered
    for rec in corpus_records():
        if rec["category"] in ("en", "code"):
            t = rec.get("source", "") + rec["target"]
            ids = old.encode(t, add_special_tokens=False)
            assert new.encode(t, add_special_tokens=False) == [id_map[i] for i in ids]
    for t in ROUND_TRIP:  # Chinese falls back to byte tokens, still exact
        assert new.decode(new.encode(t, add_special_tokens=False)) == t
    tj = json.loads((out / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    assert all(a in vocab and b in vocab and a + b in vocab for a, b in tj["model"]["merges"])


def _random_bpe_case(rng, score: bool):
    """A random text over 2-3 letters with random merges (SentencePiece scores with ties, or Hugging Face ranks with
    a vocabulary and character starts): what make_reachable's choices depend on, small enough to search widely."""
    text = "".join(rng.choice("ab" if rng.random() < 0.4 else "abc") for _ in range(rng.randint(5, 24)))
    if score:
        scores = {}
        for _ in range(rng.randint(0, 12)):
            n = rng.randint(2, 4)
            at = rng.randint(0, len(text) - n)
            scores[text[at : at + n]] = rng.choice([-1.0, -2.0, -3.0, rng.random()])
        return text, lambda: ScoreBPE(dict(scores)), None, None
    ranks, vocab = {}, set(text)
    for _ in range(rng.randint(0, 12)):
        at, n = rng.randint(0, len(text) - 2), rng.randint(1, 2)
        left, right = text[at : at + n], text[at + n : at + n + rng.randint(1, 2)]
        if right and (left, right) not in ranks:
            ranks[(left, right)] = len(ranks)
            vocab |= {left, right, left + right}
    vocab |= {text[i : i + 3] for i in rng.sample(range(len(text) - 2), 3)}
    starts = {k for k in range(len(text)) if rng.random() < 0.6} | {0, len(text)}
    return text, lambda: RankBPE(dict(ranks)), frozenset(vocab), starts


def test_fast_bpe_matches_the_naive_reference():
    """The heap-based BPE and the incremental make_reachable give what the quadratic originals (the baseline of
    bench/bpe_reachable.py, with today's pair rule) give: the same merges in order, links and intermediates."""
    import functools
    import random

    from bpe_reachable import naive_make_reachable, naive_segment

    from colossal_shear.vocab.bpe import make_reachable

    rng = random.Random(0)
    for case in range(600):
        text, make_bpe, vocab, starts = _random_bpe_case(rng, score=case % 2 == 0)
        results = []
        naive = functools.partial(naive_make_reachable, shortest=True)
        for segment, reachable in ((naive_segment, naive), (None, make_reachable)):
            bpe, links, trace = make_bpe(), [], []
            known = set(vocab or ())

            def add_link(left, right, final, bpe=bpe, links=links, known=known):
                links.append((left, right, final))
                known.add(left + right)
                if isinstance(bpe, ScoreBPE):
                    bpe.scores.setdefault(left + right, -100.0 - len(links))
                else:
                    bpe.ranks[(left, right)] = len(bpe.ranks)

            seg = segment(text, bpe.rank, trace) if segment else bpe.segment(text, trace)
            inter = reachable(text, bpe, add_link, known.__contains__ if vocab else None, starts)
            results.append((seg, trace, links, inter, bpe.segment(text)))
        assert results[0] == results[1], text
        assert results[1][-1] == [text]


@pytest.mark.parametrize("kind", ["sentencepiece", "byte-level"])
def test_a_long_piece_is_added_quickly_and_produced_whole(tokenizer_dir, byte_dir, tmp_path, kind):
    """4,096 characters (the quadratic version took minutes for a quarter of that) become one token: English
    letters for SentencePiece, Chinese (12,288 byte symbols) for the byte-level BPE. `sentencepiece` loads no piece
    over 7,999 bytes, so there a longer one is rejected, with the reason, instead of breaking the output."""
    script = (lambda ch: ch.isascii()) if kind == "sentencepiece" else (lambda ch: ord(ch) > 0x2E80)
    letters = "".join(ch for t in texts() for ch in t if ch.isalpha() and script(ch))  # one pre-token
    piece = (" " if kind == "sentencepiece" else "") + (letters * (4096 // len(letters) + 1))[:4096]
    src = tokenizer_dir if kind == "sentencepiece" else byte_dir
    out = tmp_path / "long"
    pieces = [piece, "知" * 2700] if kind == "sentencepiece" else [piece]
    r = init_tokenizer(cfg(src, out, expand_tokens_file=write_pieces(tmp_path / "p.jsonl", pieces)))
    assert r.pieces.added == 1 and r.pieces.unreachable == 0 and r.pieces.intermediates > 1000
    new = AutoTokenizer.from_pretrained(out)
    internal = byte_level(piece) if kind == "byte-level" else "\u2581" + piece[1:]
    assert new.encode(piece[1:] if kind == "sentencepiece" else piece, add_special_tokens=False) == [
        new.convert_tokens_to_ids(internal)
    ]
    if kind == "sentencepiece":
        assert sp(out).encode(piece[1:], out_type=str) == [internal]
        assert r.pieces.rejected_invalid == 1 and "8,100 bytes in UTF-8" in r.format()


def test_reference_bpe_matches_tokenizers(byte_dir):
    tj = json.loads((byte_dir / "tokenizer.json").read_text())
    bpe = RankBPE({tuple(m): r for r, m in enumerate(tj["model"]["merges"])})
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(str(byte_dir / "tokenizer.json"))
    checked = 0
    for t in texts()[::5]:
        for word, _ in tk.pre_tokenizer.pre_tokenize_str(t[:400]):
            if word in tj["model"]["vocab"]:
                continue  # ignore_merges: whole words bypass BPE
            assert bpe.segment(word) == [x.value for x in tk.model.tokenize(word)]
            checked += 1
    assert checked > 100


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def test_report_counts(tokenizer_dir, tmp_path):
    lines = [
        '{"piece": "人工智能"}',
        '{"piece": "翻译"}',
        '{"piece": "人工智能"}',
        '{"piece": " the"}',
        '{"piece": ""}',
        '{"piece": "   "}',
        '{"piece": "\\u2581\\u2581"}',
        '{"piece": "a\\u0007b"}',
        '{"piece": "<s>"}',
        "",
        '{"piece": "发展", "freq": 3}',
    ]
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    r = init_tokenizer(cfg(tokenizer_dir, tmp_path / "out", expand_tokens_file=f, eval_file=[EN, ZH]))
    s = r.pieces
    assert (s.requested, s.added, s.duplicates, s.present) == (10, 3, 1, 2)
    assert (s.rejected_empty, s.rejected_whitespace, s.rejected_invalid) == (1, 2, 1)
    assert r.vocab_before == 2048 and r.vocab_after == 2048 + s.added + s.intermediates
    assert any("p.jsonl:3" in e for e in s.examples["duplicate"])
    text = r.format()
    for needle in ("before     2,048", "skipped: duplicates    1", "rejected               4", "tokens per character"):
        assert needle in text
    # tokens per character, per category, recomputed independently
    old, new = sp(tokenizer_dir), sp(tmp_path / "out")
    rows = {row.category: row for row in r.eval}
    assert set(rows) == {"en", "zh", "all"}
    for cat in ("en", "zh"):
        recs = [x.get("source", "") + x["target"] for x in corpus_records() if x["category"] == cat]
        assert rows[cat].chars == sum(map(len, recs))
        assert rows[cat].tokens_before == sum(len(old.encode(t)) for t in recs)
        assert rows[cat].tokens_after == sum(len(new.encode(t)) for t in recs)
    assert rows["zh"].tpc_after < rows["zh"].tpc_before
    saved = json.loads((tmp_path / "out" / "vocab_report.json").read_text())
    assert saved["pieces"]["added"] == 3 and saved["eval"][0]["category"] == "en"


def test_counting_in_worker_processes_matches(tokenizer_dir):
    from colossal_shear.vocab.tokenizer import open_tokenizer

    v = open_tokenizer(tokenizer_dir)
    one = count_tokens([EN, ZH], v.encoder_spec(tokenizer_dir), len(v), 1, False)
    two = count_tokens([EN, ZH], v.encoder_spec(tokenizer_dir), len(v), 2, False)
    assert (one.counts == two.counts).all() and one.per_category == two.per_category
    s = sp(tokenizer_dir)
    recs = [r.get("source", "") + r["target"] for r in corpus_records() if r["category"] in ("en", "zh")]
    assert one.tokens == sum(len(s.encode(t)) for t in recs) and one.records == len(recs)


def test_without_intermediate_pieces_unreachable_pieces_are_counted(tokenizer_dir, tmp_path):
    f = write_pieces(tmp_path / "p.txt", [" hello", "人工智能"], jsonl=False)
    r = init_tokenizer(cfg(tokenizer_dir, tmp_path / "bare", expand_tokens_file=f, add_intermediates=False))
    assert r.pieces.added == 2 and r.pieces.intermediates == 0 and r.pieces.unreachable == 2
    assert "unreachable" in r.format()
    assert "\u2581hello" not in sp(tmp_path / "bare").encode("hello", out_type=str)
    r = init_tokenizer(cfg(tokenizer_dir, tmp_path / "full", expand_tokens_file=f))
    assert r.pieces.unreachable == 0 and r.pieces.intermediates > 0
    assert sp(tmp_path / "full").encode("hello", out_type=str) == ["\u2581hello"]


# ----------------------------------------------------------------------------------------------------------------
# Bad input: clear errors, nothing half-written
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"piece": "a"}\n{"piece": "b"\n', "p.jsonl:2: invalid JSON"),
        ('{"piece": "a"}\n\n{"word": "b"}\n', "p.jsonl:3: missing the 'piece' field"),
        ('{"piece": 7}\n', "p.jsonl:1: 'piece' must be a string"),
        ('["a"]\n', "p.jsonl:1: expected a JSON object"),
    ],
)
def test_malformed_piece_file_names_file_and_line(tokenizer_dir, tmp_path, content, message):
    f = tmp_path / "p.jsonl"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(VocabError, match=message.replace("(", r"\(")):
        init_tokenizer(cfg(tokenizer_dir, tmp_path / "out", expand_tokens_file=f))
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path, "out")


@pytest.mark.parametrize("jsonl", [True, False])
def test_an_absurdly_long_piece_is_one_error_naming_file_and_line(tokenizer_dir, tmp_path, jsonl):
    f = write_pieces(tmp_path / ("p.jsonl" if jsonl else "p.txt"), ["知识", "知" * (MAX_PIECE_CHARS + 1)], jsonl)
    with pytest.raises(VocabError, match=f"{f.name}:2: a piece of 8,193 characters; pieces have at most 8,192"):
        init_tokenizer(cfg(tokenizer_dir, tmp_path / "out", expand_tokens_file=f))
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path, "out")


def test_bad_corpus_line_and_encoding(tokenizer_dir, tmp_path):
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"text": "ok"}\n{"source": "a", "target": 3}\n', encoding="utf-8")
    with pytest.raises(VocabError, match=r"c.jsonl:2: expected a string, got number \(field 'target'\)"):
        init_tokenizer(cfg(tokenizer_dir, tmp_path / "out", prune_corpus=[bad]))
    nope = tmp_path / "n.jsonl"
    nope.write_text('{"text": "ok"}\n{"category": "en"}\n', encoding="utf-8")
    with pytest.raises(VocabError, match=r"n.jsonl:2: missing field \(field 'target'"):
        init_tokenizer(cfg(tokenizer_dir, tmp_path / "out", prune_corpus=[nope]))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("line one\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(VocabError, match=r"latin.txt:2: invalid UTF-8"):
        init_tokenizer(cfg(tokenizer_dir, tmp_path / "out", expand_tokens_file=latin))
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path, "out")


def test_missing_and_unreadable_inputs(tokenizer_dir, tmp_path):
    with pytest.raises(VocabError, match="--expand_tokens_file not found: .*missing.jsonl"):
        init_tokenizer(cfg(tokenizer_dir, tmp_path / "out", expand_tokens_file=tmp_path / "missing.jsonl"))
    with pytest.raises(VocabError, match="--prune_corpus file is a directory"):
        init_tokenizer(cfg(tokenizer_dir, tmp_path / "out", prune_corpus=[tmp_path]))
    with pytest.raises(VocabError, match="source tokenizer directory not found"):
        init_tokenizer(cfg(tmp_path / "nowhere", tmp_path / "out", prune_corpus=[EN]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(VocabError, match="no tokenizer in .*empty: expected tokenizer.model"):
        init_tokenizer(cfg(tmp_path / "empty", tmp_path / "out", prune_corpus=[EN]))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(VocabError, match="is not a SentencePiece model"):
        init_tokenizer(cfg(tmp_path / "broken", tmp_path / "out", prune_corpus=[EN]))
    with pytest.raises(VocabError, match="nothing to do"):
        init_tokenizer(cfg(tokenizer_dir, tmp_path / "out"))
    with pytest.raises(VocabError, match="--keep_top_k / --min_count need --prune_corpus"):
        init_tokenizer(cfg(tokenizer_dir, tmp_path / "out", expand_tokens_file=EN, keep_top_k=3))
    if os.geteuid() != 0:
        locked = tmp_path / "locked.txt"
        locked.write_text("a\n")
        locked.chmod(0)
    else:  # root reads any file; /proc/self/mem refuses a read at offset 0 (EIO) even to root
        locked = Path("/proc/self/mem")
    with pytest.raises(VocabError, match="cannot read --expand_tokens_file"):
        init_tokenizer(cfg(tokenizer_dir, tmp_path / "out", expand_tokens_file=locked))
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path, "out")


def test_existing_target_refused_unless_overwrite(tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    f = write_pieces(tmp_path / "p.jsonl", ["人工智能"])
    with pytest.raises(VocabError, match="already exists; pass --overwrite"):
        init_tokenizer(cfg(tokenizer_dir, out, expand_tokens_file=f))
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(VocabError, match="is the source directory"):
        init_tokenizer(cfg(tokenizer_dir, tokenizer_dir, expand_tokens_file=f, overwrite=True))
    init_tokenizer(cfg(tokenizer_dir, out, expand_tokens_file=f, overwrite=True))
    assert not (out / "keep.txt").exists() and sp(out).piece_to_id("人工智能") == 2048
    assert not leftovers(tmp_path, "out")


# ----------------------------------------------------------------------------------------------------------------
# The CLI, as users run it
# ----------------------------------------------------------------------------------------------------------------


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(ROOT / "tokenizer" / "init_tokenizer.py"), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_cli(tokenizer_dir, tmp_path):
    f = write_pieces(tmp_path / "pieces.txt", ["人工智能", "深度学习", "人工智能"], jsonl=False)
    out = tmp_path / "cli"
    proc = _cli(
        "--source_tokenizer_dir",
        tokenizer_dir,
        "--target_tokenizer_dir",
        out,
        "--expand_tokens_file",
        f,
        "--eval_file",
        ZH,
        "--num_workers",
        "2",
        "--no_progress",
    )
    assert proc.returncode == 0, proc.stderr
    assert "added                  2" in proc.stdout and "skipped: duplicates    1" in proc.stdout
    assert "zh" in proc.stdout and (out / "id_map.json").exists()
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("深度学习") == 2049
    proc = _cli("--source_tokenizer_dir", tokenizer_dir, "--target_tokenizer_dir", out, "--expand_tokens_file", f)
    assert (
        proc.returncode == 2 and proc.stderr.startswith("init_tokenizer.py: error: ") and "--overwrite" in proc.stderr
    )
    assert "Traceback" not in proc.stderr
