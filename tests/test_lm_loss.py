"""The chunked LM loss and distillation loss (colossal_shear.train.losses): the same loss and gradients as the
reference over full fp32 logits, on their own, inside the bundled Llama models (tied and untied heads, packed
batches), under the Booster plugins, and with the memory bound the chunking exists for."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, run_distributed
from transformers import AutoModelForCausalLM

from colossal_shear.train import attention, losses
from colossal_shear.train.losses import (
    CHUNK_BYTES,
    chunk_rows,
    chunked_cross_entropy,
    chunked_kd_loss,
    install_chunked_loss,
    kd_loss,
)
from colossal_shear.train.stages.distill import Distillation

TOL = dict(atol=1e-5, rtol=1e-5)


def _random_case(vocab=50, hidden=8, batch=2, length=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, length, hidden, generator=g, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=g, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[0, 3:6] = -100
    return h, w, labels


@pytest.mark.parametrize("chunk_tokens", [1, 5, 7, 100])
def test_chunked_cross_entropy_matches_full_logits(chunk_tokens):
    h, w, labels = _random_case()
    loss = chunked_cross_entropy(h, w, labels, chunk_tokens=chunk_tokens)
    ref = F.cross_entropy((h @ w.T)[:, :-1].reshape(-1, w.shape[0]), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ref, **TOL)
    for got, want in zip(torch.autograd.grad(loss * 3, (h, w)), torch.autograd.grad(ref * 3, (h, w))):
        torch.testing.assert_close(got, want, **TOL)


def test_chunked_cross_entropy_sum_over_num_items_and_no_labels():
    h, w, labels = _random_case()
    loss = chunked_cross_entropy(h, w, labels, num_items_in_batch=40, chunk_tokens=3)
    ref = F.cross_entropy((h @ w.T)[:, :-1].reshape(-1, w.shape[0]), labels[:, 1:].reshape(-1), reduction="sum") / 40
    torch.testing.assert_close(loss, ref, **TOL)
    none = chunked_cross_entropy(h, w, torch.full_like(labels, -100))
    assert none.item() == 0.0
    with torch.no_grad():  # evaluation: no gradient buffers
        torch.testing.assert_close(chunked_cross_entropy(h, w, labels), ref * 40 / (labels[:, 1:] != -100).sum(), **TOL)


@pytest.mark.parametrize(
    "vocab, hidden, dtype, fp32_buffers, bytes_per_logit, budget",
    [
        (128256, 64, torch.float32, 2, 8, CHUNK_BYTES),  # the bench's case: the floor, 65 tokens
        (128256, 64, torch.bfloat16, 2, 10, CHUNK_BYTES),  # + the head-dtype copy: 52 tokens
        (32000, 64, torch.float16, 5, 22, CHUNK_BYTES),  # the distillation loss's five fp32 buffers
        (128256, 2048, torch.bfloat16, 2, 10, 128256 * 2048 * 4),  # a large head: its fp32 gradient, 819 tokens
        (32000, 4096, torch.float32, 2, 8, 32000 * 4096 * 4),  # 2,048 tokens
    ],
)
def test_chunk_rows_follow_the_memory_budget(vocab, hidden, dtype, fp32_buffers, bytes_per_logit, budget):
    """A chunk takes as many tokens as its vocabulary-sized buffers fit in the budget: max(CHUNK_BYTES, the head's
    fp32 gradient), whatever the vocabulary and the head's dtype."""
    weight = torch.empty(vocab, hidden, dtype=dtype, device="meta")
    rows = chunk_rows(weight, fp32_buffers)
    assert rows * vocab * bytes_per_logit <= budget < (rows + 1) * vocab * bytes_per_logit
    assert chunk_rows(weight, fp32_buffers, chunk_bytes=3 * vocab * bytes_per_logit) == 3
    assert chunk_rows(weight, fp32_buffers, chunk_bytes=1) == 1  # never an empty chunk


def test_loss_with_budget_sized_chunks_matches_full_logits(monkeypatch):
    """With chunks sized by the budget (here 5 tokens' worth), the loss and gradients stay the full logits' ones."""
    h, w, labels = _random_case()
    monkeypatch.setattr(losses, "CHUNK_BYTES", 5 * w.shape[0] * 8 + 7)
    sizes = []
    apply = losses._ChunkedCrossEntropy.apply
    monkeypatch.setattr(losses._ChunkedCrossEntropy, "apply", lambda *a: sizes.append(a[4]) or apply(*a))
    loss = chunked_cross_entropy(h, w, labels)
    assert sizes == [5]
    ref = F.cross_entropy((h @ w.T)[:, :-1].reshape(-1, w.shape[0]), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ref, **TOL)
    for got, want in zip(torch.autograd.grad(loss, (h, w)), torch.autograd.grad(ref, (h, w))):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_kd_matches_kd_loss(temperature):
    h, w, labels = _random_case()
    g = torch.Generator().manual_seed(5)
    th, tw = torch.randn(2, 13, 6, generator=g), torch.randn(50, 6, generator=g)
    loss = chunked_kd_loss(h, w, th, tw, labels, temperature, chunk_tokens=4)
    ref = kd_loss(h @ w.T, th @ tw.T, labels, temperature)
    torch.testing.assert_close(loss, ref, **TOL)
    for got, want in zip(torch.autograd.grad(loss, (h, w)), torch.autograd.grad(ref, (h, w))):
        torch.testing.assert_close(got, want, **TOL)


def _packed_batch(vocab, batch=2, length=32, seed=0):
    """Two rows of packed documents with restarting positions and -100 on each document's first token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    docs = torch.tensor([[0] * 10 + [1] * 15 + [2] * 7, [0] * 20 + [1] * 12])[:batch, :length]
    pos = torch.cat([torch.cat([torch.arange((row == d).sum()) for d in row.unique()]) for row in docs]).view(batch, -1)
    labels = ids.clone()
    labels[pos == 0] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "document_ids": docs}


def _grads(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fixture", ["model_dir", "tied_model_dir"])
def test_model_loss_and_grads_match_reference(fixture, request):
    """The installed forward gives the model's own loss and every parameter's gradient (packed rows, dense mask)."""
    path = request.getfixturevalue(fixture)
    ref = attention.install(AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa"), "sdpa")
    chunked = attention.install(AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa"), "sdpa")
    install_chunked_loss(chunked, chunk_tokens=7)
    inputs = _packed_batch(ref.config.vocab_size)
    ref_out, ref_grads = _grads(ref, inputs)
    out, grads = _grads(chunked, inputs)
    assert out.logits is None and out.last_hidden_state is not None  # the whole point: no logits held
    torch.testing.assert_close(out.loss, ref_out.loss, **TOL)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL, msg=name)
    assert chunked(input_ids=inputs["input_ids"]).logits.shape[-1] == ref.config.vocab_size  # no labels: logits


def test_distillation_hook_chunked_matches_full(model_dir, tied_model_dir):
    """The distillation stage hook on the chunked output (hidden states) equals it on full logits."""
    from colossal_shear.train.config import DistillConfig

    teacher = attention.install(
        AutoModelForCausalLM.from_pretrained(tied_model_dir, attn_implementation="sdpa"), "sdpa"
    ).requires_grad_(False)
    inputs = _packed_batch(teacher.config.vocab_size)
    terms, grads = [], []
    for chunked in (False, True):
        student = attention.install(AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa"), "sdpa")
        if chunked:
            install_chunked_loss(student, chunk_tokens=5)
        hook = Distillation(DistillConfig(kd_weight=1.0, kd_temperature=2.0), teacher, 1)
        out = student(**inputs)
        term = hook.extra_loss(0, inputs, out)
        term.backward()
        terms.append(term.detach())
        grads.append({n: p.grad for n, p in student.named_parameters()})
    torch.testing.assert_close(terms[1], terms[0], **TOL)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, **TOL, msg=name)


@pytest.mark.parametrize(
    "case",
    [["--plugin", "ddp"], ["--plugin", "zero2"], ["--plugin", "3d", "--tp", "2"], ["--plugin", "3d"]],
    ids=["ddp", "zero2", "3d_tp2", "3d_dp2"],
)
def test_plugins_train_the_same_with_chunked_loss(case, model_dir, tmp_path):
    """Under each plugin, 3 fp32 steps with the chunked loss follow the steps with the model's own loss. Under 3d
    with tp the head is vocabulary-parallel and shardformer's forward (its own loss) runs: the worker reports it."""
    run_distributed(ROOT / "tests" / "workers" / "lm_loss_steps.py", "--model", model_dir, "--out", tmp_path, *case)
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["chunked"] == pytest.approx(record["full"], abs=1e-5, rel=1e-5), record
        assert record["chunked"][-1] < record["chunked"][0]
        assert record["path"] == ("reference (shardformer forward)" if "--tp" in case else "chunked"), record


def test_padded_head_of_3d_keeps_the_real_vocabulary(model_dir):
    """Under 3d without tp shardformer pads the LM head to a multiple of 64 rows (PaddingLMHead): the padding rows
    must stay out of the chunked softmax."""
    from colossalai.shardformer.layer import PaddingLMHead

    ref = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    vocab = ref.config.vocab_size
    install_chunked_loss(model)  # as build_model does, before boosting replaces the head
    model.lm_head = PaddingLMHead.from_native_module(model.lm_head, None, make_vocab_size_divisible_by=vocab + 64)
    assert model.lm_head.weight.shape[0] > vocab  # really padded
    inputs = {k: v for k, v in _packed_batch(vocab).items() if k != "document_ids"}
    (ref_out, ref_grads), (out, grads) = _grads(ref, inputs), _grads(model, inputs)
    torch.testing.assert_close(out.loss, ref_out.loss, **TOL)
    torch.testing.assert_close(grads["lm_head.weight"][:vocab], ref_grads["lm_head.weight"], **TOL)
    assert not grads["lm_head.weight"][vocab:].any()


def test_memory_bench_shows_the_chunked_loss_holding_less():
    """bench/lm_loss_memory.py at a small size (65,536 vocabulary, 2 × 1,024 tokens: 512 MB of fp32 logits): the
    chunked loss peaks well below the full one, with the same losses."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench/lm_loss_memory.py"), "--vocab", "65536", "--seq", "1024", "--steps", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {
        line.split("|")[1].strip(): line.split("|")[2:]
        for line in proc.stdout.splitlines()
        if line.startswith("| full") or line.startswith("| chunked")
    }
    full, chunked = float(rows["full"][0]), float(rows["chunked"][0])
    assert chunked < full - 0.5, proc.stdout
    assert rows["full"][3] == rows["chunked"][3], proc.stdout  # the same losses
