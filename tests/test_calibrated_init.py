"""`init_model.py --init calibrated` on the bundled tiny models: old rows bit-identical, the fitted objective is the
model's real next-token loss, deterministic bytes, tied / untied, refinement, chunking, gradients, and clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, ZH_WORDS
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from colossal_shear.bundled import CORPUS_DIR
from colossal_shear.vocab import TokenizerConfig, VocabError, init_tokenizer
from colossal_shear.vocab import calibration as ci
from colossal_shear.vocab.resize import ResizeConfig, ResizeError, resize_model
from colossal_shear.vocab.rows import NEW_ROWS_FILE, from_ranges, old_rows, to_ranges

ROOT = Path(__file__).resolve().parent.parent


def resize(src, tok, dst, **kw):
    kw.setdefault("progress", False)
    return resize_model(
        ResizeConfig(
            source_model_and_tokenizer_path=Path(src),
            target_tokenizer_path=Path(tok),
            target_model_path=Path(dst),
            **kw,
        )
    )


def load(d):
    return AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("calib")


@pytest.fixture(scope="module")
def tok(tokenizer_dir, work):
    words = work / "zh_words.jsonl"
    words.write_text("".join(json.dumps({"piece": w}, ensure_ascii=False) + "\n" for w in ZH_WORDS), encoding="utf-8")
    out = work / "tok-zh"
    init_tokenizer(
        TokenizerConfig(
            source_tokenizer_dir=tokenizer_dir,
            target_tokenizer_dir=out,
            expand_tokens_file=words,
            num_workers=1,
            progress=False,
        )
    )
    return out


@pytest.fixture(scope="module")
def calib(work):
    """Chinese calibration records (JSONL, `source` + `target`), disjoint halves of the bundled zh corpus."""
    lines = (CORPUS_DIR / "zh.jsonl").read_text(encoding="utf-8").splitlines()
    path = work / "calib.jsonl"
    path.write_text("\n".join(lines[:40]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def calibrated(model_dir, tied_model_dir, tok, calib, work):
    out = {}
    for name, src, extra in (
        ("untied", model_dir, {}),
        ("tied", tied_model_dir, {}),
        ("untie", tied_model_dir, {"untie_embeddings": True}),
    ):
        dst = work / f"cal-{name}"
        out[name] = (
            src,
            dst,
            resize(src, tok, dst, init="calibrated", calibration_file=[calib], calibration_tokens=1500, **extra),
        )
    out["sub"] = (model_dir, work / "sub", resize(model_dir, tok, work / "sub"))
    return out


def _old_ids(n=2048, shape=(3, 40), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, n, shape, generator=g)


@pytest.mark.parametrize("name", ["untied", "tied", "untie"])
def test_old_rows_and_old_logits_are_bit_identical(calibrated, name):
    src, dst, report = calibrated[name]
    a, b = load(src), load(dst)
    assert torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight[:2048])
    assert torch.equal(a.lm_head.weight, b.lm_head.weight[:2048])
    x = _old_ids()
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits[..., :2048])
    assert report.calibration["loss_fit"] < report.calibration["loss_subtoken_mean"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_keeps_old_logits_bit_identical(family, family_model, tok, calib, work):
    """`--init calibrated` on each family's tiny model (Gemma: embeddings scaled by sqrt(hidden); Gemma 2: soft-capped
    logits, fitted before the cap and said so): old rows and old-token logits bit-identical, the fit better than
    the sub-token mean."""
    src, dst = family_model(family), work / f"family-{family}"
    report = resize(src, tok, dst, init="calibrated", calibration_file=[calib], calibration_tokens=300)
    a, b = load(src), load(dst)
    assert b.config.model_type == a.config.model_type
    for get in ("get_input_embeddings", "get_output_embeddings"):
        assert torch.equal(getattr(a, get)().weight, getattr(b, get)().weight[:2048])
    x = _old_ids()
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits[..., :2048])
    assert report.calibration["loss_fit"] < report.calibration["loss_subtoken_mean"]
    assert any("soft-caps its logits" in n for n in report.notes) == bool(
        a.config.to_dict().get("final_logit_softcapping")
    )


def test_tied_stays_tied_untie_unties(calibrated, tok):
    n_tok = len(AutoTokenizer.from_pretrained(tok))
    tied = load(calibrated["tied"][1])
    assert tied.config.tie_word_embeddings
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    with safe_open(str(calibrated["tied"][1] / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    assert calibrated["tied"][2].tied and calibrated["tied"][2].calibration["passes"] == 2
    untie, sub = load(calibrated["untie"][1]), load(calibrated["sub"][1])
    assert not untie.config.tie_word_embeddings and not calibrated["untie"][2].tied
    with safe_open(str(calibrated["untie"][1] / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in f.keys()
    assert any("untied" in n for n in calibrated["untie"][2].notes)
    new = torch.arange(2048, n_tok)
    # tied: the one shared row is the calibrated one, not the sub-token mean
    resize_model(ResizeConfig(calibrated["tied"][0], tok, calibrated["tied"][1].parent / "tied-sub", progress=False))
    ts = load(calibrated["tied"][1].parent / "tied-sub")
    assert not torch.allclose(tied.model.embed_tokens.weight[new], ts.model.embed_tokens.weight[new])
    # untied (and untied from a tied source): input rows w·(sub-token mean) + (1 - w)·(last sub-token row) for the
    # reported w, head rows calibrated
    for name, plain in (("untie", ts), ("untied", sub)):
        src, dst, report = calibrated[name]
        w = report.calibration["input_weight"]
        assert w in (1.0, 0.5, 0.0) and set(report.calibration["input_losses"]) == {"1", "0.5", "0"}
        assert report.calibration["input_losses"][f"{w:g}"] == min(report.calibration["input_losses"].values())
        model, source = load(dst), load(src)
        expected = plain.model.embed_tokens.weight[new] * w + _last_rows(src, tok, source) * (1 - w)
        torch.testing.assert_close(model.model.embed_tokens.weight[new], expected, rtol=0, atol=1e-6)
        assert not torch.allclose(model.lm_head.weight[new], plain.lm_head.weight[new])


def _last_rows(src, tok, source):
    """Each new piece's last sub-token row under the source tokenizer (independently of calibrated_init)."""
    from colossal_shear.vocab.resize import subtoken_ids

    old_tok, new_tok = AutoTokenizer.from_pretrained(src), AutoTokenizer.from_pretrained(tok)
    ids = list(range(2048, len(new_tok)))
    subs = subtoken_ids(old_tok, new_tok, ids, 2048)
    return source.model.embed_tokens.weight[[subs[i][-1] for i in ids]]


def _calibration_loss(model_dir, calib, tokens):
    """The model's own next-token loss (HF forward + cross_entropy) on the calibration windows."""
    model, tok = load(model_dir), AutoTokenizer.from_pretrained(model_dir)
    windows = ci.calibration_windows([calib], tok, tokens, 512)
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w])
            logits = model(ids).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += len(w) - 1
    assert count == tokens
    return total / count


def test_fitted_loss_is_the_models_real_calibration_loss(calibrated, calib):
    """For an untied model the hidden states do not depend on the head: the fitted objective must equal the saved
    model's cross-entropy on the calibration text, and the sub-token-mean loss the plain resize's."""
    _, dst, report = calibrated["untied"]
    assert report.calibration["positions"] == 1500
    assert _calibration_loss(dst, calib, 1500) == pytest.approx(report.calibration["loss_final"], abs=2e-4)
    c = report.calibration
    assert c["loss_final"] <= c["loss_fit"] + 1e-6 and c["loss_fit"] < c["loss_subtoken_mean"]
    assert c["bias"]["spread"] < 1 and set(c["bias"]["held_out"]) == {"0.1", "0.3", "1"}
    assert _calibration_loss(calibrated["sub"][1], calib, 1500) == pytest.approx(
        report.calibration["loss_subtoken_mean"], abs=2e-4
    )
    assert 0 < report.calibration["new_targets"] < 1500
    # tied: the report's final loss is the saved model's
    _, tdst, treport = calibrated["tied"]
    assert _calibration_loss(tdst, calib, 1500) == pytest.approx(treport.calibration["loss_final"], abs=2e-4)
    tc = treport.calibration
    assert tc["tied_mix"] in (0.0, 0.25, 0.5) and set(tc["input_losses"]) == {"0", "0.25", "0.5"}
    assert tc["loss_final"] == tc["input_losses"][f"{tc['tied_mix']:g}"] == min(tc["input_losses"].values())


def test_deterministic_bytes_and_refinement(model_dir, tok, calib, work, calibrated):
    r1 = resize(model_dir, tok, work / "det1", init="calibrated", calibration_file=[calib], calibration_tokens=1500)
    assert (work / "det1" / "model.safetensors").read_bytes() == (
        calibrated["untied"][1] / "model.safetensors"
    ).read_bytes()
    assert r1.calibration["coefficients"] == calibrated["untied"][2].calibration["coefficients"]
    kw = dict(init="calibrated", calibration_file=[calib], calibration_tokens=1500, calibration_refine_steps=4)
    r2 = resize(model_dir, tok, work / "ref1", **kw)
    resize(model_dir, tok, work / "ref2", **kw)
    assert (work / "ref1" / "model.safetensors").read_bytes() == (work / "ref2" / "model.safetensors").read_bytes()
    c = r2.calibration
    assert c["loss_refined"] is not None and 0 <= c["refine_steps_taken"] <= 4
    a, b = load(model_dir), load(work / "ref1")
    assert torch.equal(a.lm_head.weight, b.lm_head.weight[:2048])


def test_new_rows_file(calibrated, tok, model_dir):
    n_tok = len(AutoTokenizer.from_pretrained(tok))
    for name in ("untied", "tied", "sub"):
        dst = calibrated[name][1]
        data = json.loads((dst / NEW_ROWS_FILE).read_text())
        vocab = json.loads((dst / "config.json").read_text())["vocab_size"]
        assert data["vocab_size"] == vocab and data["tokenizer_size"] == n_tok
        assert data["old_rows"] == [[0, 2048]] and data["new_rows"] == [[2048, n_tok]]
        assert data["padding_rows"] == ([[n_tok, vocab]] if vocab > n_tok else [])
        assert torch.equal(old_rows(dst, vocab), torch.arange(2048))
    # without new_rows.json the id map says the same; without either, a clear error
    dst = calibrated["sub"][1]
    (dst / NEW_ROWS_FILE).rename(dst / "moved.json")
    try:
        assert torch.equal(old_rows(dst, vocab), torch.arange(2048))
    finally:
        (dst / "moved.json").rename(dst / NEW_ROWS_FILE)
    with pytest.raises(VocabError, match="neither new_rows.json nor id_map.json"):
        old_rows(model_dir, 2048)
    assert to_ranges(torch.tensor([5, 1, 2, 3, 9])) == [[1, 4], [5, 6], [9, 10]]
    assert from_ranges([[1, 4], [9, 10]]).tolist() == [1, 2, 3, 9]


def test_gradients_and_chunking_match_autograd(monkeypatch):
    """The hand-written gradients of both objectives against autograd, and chunked == unchunked."""
    g = torch.Generator().manual_seed(0)
    P, d, V, N = 37, 8, 50, 13
    H = torch.randn(P, d, generator=g)
    head = torch.randn(V, d, generator=g)
    new_ids = torch.arange(V - N, V)
    y = torch.randint(0, V, (P,), generator=g)
    y[:10] = new_ids[torch.arange(10) % N]
    W = torch.randn(N, d, generator=g)

    def reference(Wn):
        full = torch.cat([head[: V - N], Wn])
        return torch.nn.functional.cross_entropy(H @ full.T, y)

    monkeypatch.setattr(ci, "ROW_CHUNK", 5)
    obj = ci.Objective(H, y, head, new_ids)
    loss, grad = obj.loss_and_grad(W)
    Wr = W.clone().requires_grad_(True)
    ref = reference(Wr)
    ref.backward()
    assert loss == pytest.approx(float(ref.detach()), abs=1e-5)
    torch.testing.assert_close(grad, Wr.grad, atol=1e-5, rtol=1e-4)

    A, B, C = torch.randn(N, d, generator=g), torch.randn(N, d, generator=g), torch.randn(d, generator=g)
    bucket = torch.arange(N) % 4
    theta = torch.randn(4, 3, dtype=torch.float64, generator=g)
    fit = ci.CoefficientFit(obj, A, B, C, bucket)
    floss, fgrad, fhess = fit.evaluate(theta)

    def ref_loss(th):
        rows = (
            th.reshape(4, 3)[bucket, 0:1] * A.double()
            + th.reshape(4, 3)[bucket, 1:2] * B.double()
            + th.reshape(4, 3)[bucket, 2:3] * C.double()
        )
        full = torch.cat([head[: V - N].double(), rows])
        return torch.nn.functional.cross_entropy(H.double() @ full.T, y)

    th = theta.reshape(-1).clone().requires_grad_(True)
    ref = ref_loss(th)
    ref.backward()
    assert floss == pytest.approx(float(ref.detach()), abs=1e-5)
    torch.testing.assert_close(fgrad.reshape(-1), th.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        fhess, torch.autograd.functional.hessian(ref_loss, theta.reshape(-1)), atol=1e-5, rtol=1e-4
    )
    # the fit finds the optimum: zero gradient there
    best, start, end = fit.fit()
    assert end < start and fit.evaluate(best)[1].abs().max() < 1e-5
    # the per-token bias objective
    u = torch.randn(d, generator=g)
    beta = torch.randn(N, dtype=torch.float64, generator=g)
    bl, bg = ci.BiasFit(obj, W, u).evaluate(beta, 0.7)
    br = beta.clone().requires_grad_(True)
    ref = reference(W + br.float()[:, None] * u[None, :]) + 0.5 * 0.7 * (br * br).sum() / P
    ref.backward()
    assert bl == pytest.approx(float(ref.detach()), abs=1e-5)
    torch.testing.assert_close(bg, br.grad, atol=1e-5, rtol=1e-4)
    monkeypatch.setattr(ci, "ROW_CHUNK", 4096)
    assert ci.Objective(H, y, head, new_ids).loss_and_grad(W)[0] == pytest.approx(loss, abs=1e-5)


def test_bad_calibration_inputs_are_refused(model_dir, tok, calib, work):
    empty = work / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    english = CORPUS_DIR / "en.jsonl"
    cases = [
        (dict(calibration_file=[work / "missing.jsonl"]), "calibration file not found: .*missing.jsonl"),
        (dict(calibration_file=[empty]), "calibration file .*empty.jsonl holds no text"),
        (dict(calibration_file=[english]), "contains none of the .* new tokens"),
        (dict(), "--init calibrated needs --calibration_file"),
        (dict(calibration_file=[calib], calibration_tokens=3), "--calibration_tokens must be at least 16"),
    ]
    for kw, match in cases:
        with pytest.raises(VocabError, match=match):
            resize(model_dir, tok, work / "bad", init="calibrated", **kw)
        assert not (work / "bad").exists()
    with pytest.raises(ResizeError, match="only used by --init calibrated"):
        resize(model_dir, tok, work / "bad", calibration_file=[calib])
    assert not [p for p in work.iterdir() if p.name.startswith(".bad.")]


def test_cli(model_dir, tok, calib, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = [
        sys.executable,
        str(ROOT / "tokenizer" / "init_model.py"),
        "--source_model_and_tokenizer_path",
        str(model_dir),
        "--target_tokenizer_path",
        str(tok),
        "--target_model_path",
        str(tmp_path / "m"),
    ]
    proc = subprocess.run(
        base + ["--init", "calibrated", "--calibration_file", str(calib), "--calibration_tokens", "800"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "calibration: 800 positions" in proc.stdout and "sub-tokens" in proc.stdout
    assert "calibration: input rows 1·mean + 0·last" in proc.stderr  # progress
    proc = subprocess.run(
        base[:-1] + [str(tmp_path / "m2"), "--init", "calibrated", "--calibration_file", str(tmp_path / "nope.txt")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("init_model.py: error: calibration file not found")
    assert len(proc.stderr.strip().splitlines()) == 1
