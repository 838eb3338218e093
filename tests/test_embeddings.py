"""Resizing the tiny Llama fixtures to expanded / pruned tokenizers: bit-exact logits over old (kept) tokens, tied
heads, row initialisation, padding, config ids, dtype handling, files, errors and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from colossal_shear.bundled import CORPUS_DIR, build_tiny_llama
from colossal_shear.vocab import TokenizerConfig, init_tokenizer, read_id_map
from colossal_shear.vocab import resize as embeddings
from colossal_shear.vocab.resize import ResizeConfig, ResizeError, make_plan, resize_matrix, resize_model
from colossal_shear.vocab.toy import build_byte_level_tokenizer

ROOT = Path(__file__).resolve().parent.parent
EN = CORPUS_DIR / "en.jsonl"
WORDS = ["人工智能", "深度学习", "翻译", "知识", " tokenizer", "hello"]


def tok_cfg(src, dst, **kw):
    return TokenizerConfig(
        source_tokenizer_dir=Path(src), target_tokenizer_dir=Path(dst), num_workers=1, progress=False, **kw
    )


def pieces_file(path: Path, words) -> Path:
    path.write_text("".join(json.dumps({"piece": w}, ensure_ascii=False) + "\n" for w in words), encoding="utf-8")
    return path


def resize(src, tok, dst, **kw) -> embeddings.ResizeReport:
    return resize_model(
        ResizeConfig(
            source_model_and_tokenizer_path=Path(src),
            target_tokenizer_path=Path(tok),
            target_model_path=Path(dst),
            **kw,
        )
    )


def load(d, dtype=torch.float32):
    m = AutoModelForCausalLM.from_pretrained(d, torch_dtype=dtype)
    m.eval()
    return m


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("emb")


@pytest.fixture(scope="module")
def tokenizers(tokenizer_dir, work):
    exp, pru = work / "tok-expanded", work / "tok-pruned"
    init_tokenizer(tok_cfg(tokenizer_dir, exp, expand_tokens_file=pieces_file(work / "w.jsonl", WORDS)))
    init_tokenizer(tok_cfg(tokenizer_dir, pru, prune_corpus=[EN], keep_top_k=300))
    return {"expanded": exp, "pruned": pru}


@pytest.fixture(scope="module")
def models(model_dir, tied_model_dir, tokenizers, work):
    out = {}
    for tied, src in ((False, model_dir), (True, tied_model_dir)):
        for kind, tok in tokenizers.items():
            dst = work / f"model-{kind}-{'tied' if tied else 'untied'}"
            resize(src, tok, dst)
            out[(kind, tied)] = (src, dst)
    return out


def _random_ids(pool: torch.Tensor, shape=(3, 48), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return pool[torch.randint(len(pool), shape, generator=g)]


@pytest.mark.parametrize("tied", [False, True])
def test_expansion_logits_over_old_vocab_are_bit_identical(models, tied):
    src, dst = models[("expanded", tied)]
    a, b = load(src), load(dst)
    x = _random_ids(torch.arange(3, 2048))
    la, lb = logits(a, x), logits(b, x)
    assert lb.shape[-1] == b.config.vocab_size > 2048
    assert torch.equal(la, lb[..., :2048])


@pytest.mark.parametrize("tied", [False, True])
def test_pruning_logits_over_kept_tokens_are_bit_identical(models, tokenizers, tied):
    src, dst = models[("pruned", tied)]
    id_map = read_id_map(tokenizers["pruned"] / "id_map.json")
    olds = torch.tensor(sorted(id_map))
    news = torch.tensor([id_map[o] for o in sorted(id_map)])
    x_old = _random_ids(olds)
    x_new = news[torch.searchsorted(olds, x_old)]
    a, b = load(src), load(dst)
    assert torch.equal(logits(a, x_old)[..., olds], logits(b, x_new)[..., news])
    ea, eb = a.get_input_embeddings().weight, b.get_input_embeddings().weight
    assert torch.equal(ea[olds], eb[news])


def test_tied_stays_tied_and_untied_stays_untied(models):
    for (_kind, tied), (_, dst) in models.items():
        m = load(dst)
        assert m.config.tie_word_embeddings is tied
        assert (m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()) is tied
        with safe_open(str(dst / "model.safetensors"), "pt") as f:
            assert ("lm_head.weight" in f.keys()) is (not tied)


def test_config_sizes_and_special_ids(models, tokenizers):
    for (kind, _tied), (_src, dst) in models.items():
        cfg = json.loads((dst / "config.json").read_text())
        tok = AutoTokenizer.from_pretrained(dst)
        assert cfg["vocab_size"] % 64 == 0 and cfg["vocab_size"] - 64 < len(tok) <= cfg["vocab_size"]
        assert len(tok) == len(AutoTokenizer.from_pretrained(tokenizers[kind]))
        assert tok.convert_ids_to_tokens([cfg["bos_token_id"], cfg["eos_token_id"]]) == ["<s>", "</s>"]
        gen = json.loads((dst / "generation_config.json").read_text())
        assert (gen["bos_token_id"], gen["eos_token_id"]) == (cfg["bos_token_id"], cfg["eos_token_id"])
        assert cfg["torch_dtype"] == "float32"


def test_tokenizer_files_travel_with_the_model(models, tokenizers):
    for (kind, _), (_, dst) in models.items():
        for name in (
            "tokenizer.model",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "id_map.json",
        ):
            assert (dst / name).read_bytes() == (tokenizers[kind] / name).read_bytes(), name
        tok = AutoTokenizer.from_pretrained(dst)
        m = load(dst)
        ids = tok("人工智能 hello world", return_tensors="pt").input_ids
        assert m(ids).logits.shape[-1] == m.config.vocab_size


def test_subtoken_mean_rows(models, tokenizer_dir, tokenizers):
    """Each new row is the mean of the source rows of the pieces the *old* tokenizer splits it into; the input
    embeddings and the untied head separately; padding rows are the mean of all source rows."""
    src, dst = models[("expanded", False)]
    a, b = load(src), load(dst)
    old_tok, new_tok = AutoTokenizer.from_pretrained(tokenizer_dir), AutoTokenizer.from_pretrained(dst)
    ea, eb = a.model.embed_tokens.weight, b.model.embed_tokens.weight
    ha, hb = a.lm_head.weight, b.lm_head.weight
    checked = 0
    for i in range(2048, len(new_tok)):
        piece = new_tok.convert_ids_to_tokens(i)
        # an independent split: the old vocabulary's longest pieces would be wrong; use sentencepiece on a text
        # where the piece cannot merge with a neighbour, and drop the dummy-prefix piece
        text = piece.replace("\u2581", " ")
        ids = old_tok.encode("\n" + text, add_special_tokens=False)
        ids = ids[2:] if old_tok.convert_ids_to_tokens(ids[:2]) == ["\u2581", "<0x0A>"] else None
        if ids is None or "".join(old_tok.convert_ids_to_tokens(ids)) != piece:
            continue
        torch.testing.assert_close(eb[i], ea[ids].mean(0), rtol=0, atol=1e-6)
        torch.testing.assert_close(hb[i], ha[ids].mean(0), rtol=0, atol=1e-6)
        assert not torch.allclose(eb[i], hb[i])
        checked += 1
    assert checked >= 6
    pad = torch.arange(len(new_tok), b.config.vocab_size)
    assert len(pad) > 0
    torch.testing.assert_close(eb[pad], ea.mean(0).expand(len(pad), -1), rtol=0, atol=1e-6)
    torch.testing.assert_close(hb[pad], ha.mean(0).expand(len(pad), -1), rtol=0, atol=1e-6)


def test_mean_and_normal_init_and_no_padding(model_dir, tokenizers, work):
    exp = tokenizers["expanded"]
    n = len(AutoTokenizer.from_pretrained(exp))
    r = resize(model_dir, exp, work / "mean", init="mean", pad_to_multiple_of=0)
    assert r.target_rows == n and r.padding == 0
    a, b = load(model_dir), load(work / "mean")
    mean = a.model.embed_tokens.weight.mean(0)
    torch.testing.assert_close(b.model.embed_tokens.weight[2048:], mean.expand(n - 2048, -1), rtol=0, atol=1e-6)
    resize(model_dir, exp, work / "normal1", init="normal", seed=3)
    resize(model_dir, exp, work / "normal2", init="normal", seed=3)
    n1, n2 = load(work / "normal1"), load(work / "normal2")
    rows = n1.model.embed_tokens.weight[2048:n]
    assert torch.equal(rows, n2.model.embed_tokens.weight[2048:n])  # seeded
    assert rows.std(0).mean() > 0 and not torch.allclose(rows[0], rows[1])
    assert torch.equal(n1.model.embed_tokens.weight[:2048], a.model.embed_tokens.weight)


def test_dtype_is_kept_and_downcast_needs_asking(model_dir, tokenizers, work):
    exp = tokenizers["expanded"]
    bf16 = work / "src-bf16"
    load(model_dir).to(torch.bfloat16).save_pretrained(bf16)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(bf16)
    # default: the source's dtype, both for fp32 and bf16 sources (no silent downcast, no silent upcast)
    r = resize(bf16, exp, work / "out-bf16")
    assert r.dtype == "bfloat16"
    with safe_open(str(work / "out-bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    src = AutoModelForCausalLM.from_pretrained(bf16, torch_dtype=torch.bfloat16)
    out = AutoModelForCausalLM.from_pretrained(work / "out-bf16", torch_dtype=torch.bfloat16)
    assert torch.equal(src.model.embed_tokens.weight, out.model.embed_tokens.weight[:2048])
    # explicit lossy conversions are refused without --allow_downcast, nothing written
    for src_dir, dtype in ((model_dir, "bfloat16"), (model_dir, "float16"), (bf16, "float16")):
        with pytest.raises(ResizeError, match="--allow_downcast"):
            resize(src_dir, exp, work / "refused", dtype=dtype)
        assert not (work / "refused").exists()
    r = resize(model_dir, exp, work / "down", dtype="bfloat16", allow_downcast=True)
    assert r.dtype == "bfloat16" and any("as asked" in n for n in r.notes)
    r = resize(bf16, exp, work / "up", dtype="float32")  # upcasting loses nothing
    assert r.dtype == "float32"
    # a config that claims float16 for float32 weights: the weights win
    lie = work / "src-lie"
    load(model_dir).save_pretrained(lie)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(lie)
    cfg = json.loads((lie / "config.json").read_text())
    cfg["torch_dtype"] = "float16"
    (lie / "config.json").write_text(json.dumps(cfg))
    r = resize(lie, exp, work / "out-lie")
    assert r.dtype == "float32" and any("stored as" in n for n in r.notes)


def test_pruning_remaps_pad_bos_eos(tokenizer_dir, model_dir, work):
    """A pad token past the SentencePiece vocabulary (id 2048) moves when the vocabulary is pruned; config,
    generation config and embedding padding_idx must follow it."""
    with_pad = work / "tok-pad"
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.save_pretrained(with_pad)
    m = load(model_dir)
    m.resize_token_embeddings(2049)
    m.config.pad_token_id = 2048
    m.generation_config.pad_token_id = 2048
    src = work / "model-pad"
    m.save_pretrained(src)
    tok.save_pretrained(src)
    pruned = work / "tok-pad-pruned"
    init_tokenizer(tok_cfg(src, pruned, prune_corpus=[EN], keep_top_k=100))
    resize(src, pruned, work / "model-pad-pruned")
    cfg = json.loads((work / "model-pad-pruned" / "config.json").read_text())
    new_tok = AutoTokenizer.from_pretrained(work / "model-pad-pruned")
    assert cfg["pad_token_id"] == new_tok.pad_token_id == len(new_tok) - 1 != 2048
    assert new_tok.convert_ids_to_tokens(cfg["pad_token_id"]) == "<pad>"
    gen = json.loads((work / "model-pad-pruned" / "generation_config.json").read_text())
    assert gen["pad_token_id"] == cfg["pad_token_id"]
    b = load(work / "model-pad-pruned")
    assert b.model.embed_tokens.padding_idx == cfg["pad_token_id"]
    assert torch.equal(b.model.embed_tokens.weight[cfg["pad_token_id"]], m.model.embed_tokens.weight[2048])


def test_byte_level_model_pruned_and_expanded(work):
    """The Llama-3 layout: special tokens after the BPE vocabulary move on pruning; bos/eos ids follow."""
    tok_dir = build_byte_level_tokenizer(work / "bl-tok")
    src = build_tiny_llama(work / "bl-model", tok_dir)
    pruned = work / "bl-pruned"
    init_tokenizer(tok_cfg(tok_dir, pruned, prune_corpus=[EN]))
    resize(src, pruned, work / "bl-model-pruned")
    cfg = json.loads((work / "bl-model-pruned" / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(work / "bl-model-pruned")
    assert tok.convert_ids_to_tokens([cfg["bos_token_id"], cfg["eos_token_id"]]) == [
        "<|begin_of_text|>",
        "<|end_of_text|>",
    ]
    assert cfg["bos_token_id"] < 1024
    expanded = work / "bl-exp"
    init_tokenizer(tok_cfg(tok_dir, expanded, expand_tokens_file=pieces_file(work / "bl.jsonl", WORDS)))
    resize(src, expanded, work / "bl-model-exp")
    a, b = load(src), load(work / "bl-model-exp")
    x = _random_ids(torch.arange(0, 1027))
    assert torch.equal(logits(a, x), logits(b, x)[..., :1027])


def test_resize_is_vectorised_and_loads_the_model_once(model_dir, tokenizers, work, monkeypatch):
    calls = {"cat": 0, "load": []}
    real_cat, real_load = torch.cat, AutoModelForCausalLM.from_pretrained.__func__

    def counting_cat(*a, **k):
        calls["cat"] += 1
        return real_cat(*a, **k)

    def counting_load(cls, *a, **k):
        calls["load"].append(k)
        return real_load(cls, *a, **k)

    plan = make_plan({i: i for i in range(100)}, 150, {i: [i % 100, (i * 7) % 100] for i in range(100, 150)}, 100, 64)
    monkeypatch.setattr(torch, "cat", counting_cat)
    out = resize_matrix(torch.randn(100, 8), plan)
    assert out.shape == (192, 8) and calls["cat"] == 0
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counting_load))
    resize(model_dir, tokenizers["expanded"], work / "once")
    assert len(calls["load"]) == 1
    assert calls["load"][0]["low_cpu_mem_usage"] is True and calls["load"][0]["torch_dtype"] == torch.float32


def test_errors(model_dir, tokenizer_dir, tokenizers, work):
    with pytest.raises(ResizeError, match="no model in"):
        resize(tokenizer_dir, tokenizers["expanded"], work / "e1")
    with pytest.raises(ResizeError, match="target tokenizer directory not found"):
        resize(model_dir, work / "nowhere", work / "e1")
    existing = work / "exists"
    existing.mkdir()
    with pytest.raises(ResizeError, match="already exists; pass --overwrite"):
        resize(model_dir, tokenizers["expanded"], existing)
    # an id_map.json that does not belong to this source
    bad = work / "tok-bad-map"
    bad.mkdir()
    for f in tokenizers["pruned"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    id_map = json.loads((bad / "id_map.json").read_text())
    id_map["300"], id_map["301"] = id_map["301"], id_map["300"]
    (bad / "id_map.json").write_text(json.dumps(id_map))
    with pytest.raises(ResizeError, match="id_map.json: source id 30[01] is .* but target id"):
        resize(model_dir, bad, work / "e2")
    assert not (work / "e1").exists() and not (work / "e2").exists()
    assert not [p for p in work.iterdir() if p.name.startswith((".e1.", ".e2."))]


def test_cli(model_dir, tokenizers, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        str(ROOT / "tokenizer" / "init_model.py"),
        "--source_model_and_tokenizer_path",
        str(model_dir),
        "--target_tokenizer_path",
        str(tokenizers["expanded"]),
        "--target_model_path",
        str(tmp_path / "m"),
        "--pad_to_multiple_of",
        "128",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "copied 2,048 rows" in proc.stdout
    assert json.loads((tmp_path / "m" / "config.json").read_text())["vocab_size"] == 2176
    proc = subprocess.run(cmd + ["--dtype", "float16"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("init_model.py: error: ") and "Traceback" not in proc.stderr
