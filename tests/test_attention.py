"""Attention for packed documents (colossal_shear.train.attention): which implementation a run gets, the document
mask FlexAttention receives, FlexAttention's forward and flash's flattened rows against the dense block-causal
reference. FlexAttention's gradients and flash-attn itself need a GPU: tests/test_gpu.py."""

import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from test_lm_loss import _packed_batch
from transformers import AutoModelForCausalLM

from colossal_shear.core.config import parse
from colossal_shear.data.collator import block_causal_mask
from colossal_shear.train import attention
from colossal_shear.train.attention import AttentionError, resolve
from colossal_shear.train.config import TrainConfig

# FlexAttention run eagerly on CPU (the only way it runs here) warns about exactly that, through torch's own code
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:return_lse is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning"),
]
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "choice,device,plugin,flash,expected",
    [
        ("auto", "cpu", "zero2", False, "sdpa"),
        ("auto", "cpu", "zero2", True, "sdpa"),
        ("auto", "cuda", "zero2", True, "flash"),
        ("auto", "cuda", "zero2", False, "flex"),
        ("auto", "cuda", "3d", True, "sdpa"),
        ("sdpa", "cuda", "3d", True, "sdpa"),
        ("flex", "cuda", "ddp", False, "flex"),
        ("flash", "cuda", "gemini", True, "flash"),
    ],
)
def test_resolve_picks_the_fastest_that_works(choice, device, plugin, flash, expected):
    assert resolve(choice, device, plugin, flash_installed=flash) == expected


@pytest.mark.parametrize(
    "choice,device,plugin,flash,words",
    [
        ("flex", "cpu", "zero2", False, "no backward on CPU"),
        ("flash", "cpu", "zero2", True, "needs a CUDA GPU"),
        ("flash", "cuda", "zero2", False, "not installed"),
        ("flex", "cuda", "3d", False, "shardformer replaces the attention forward"),
        ("flash", "cuda", "3d", True, "shardformer replaces the attention forward"),
    ],
)
def test_resolve_refuses_with_the_reason(choice, device, plugin, flash, words):
    with pytest.raises(AttentionError, match=words):
        resolve(choice, device, plugin, flash_installed=flash)


def test_use_flash_attn_is_an_alias_and_refused_on_cpu(model_dir, tmp_path):
    assert parse(TrainConfig, ["--use_flash_attn"]).model.attn_implementation == "flash"
    assert parse(TrainConfig, []).model.attn_implementation == "auto"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "--pretrained",
            str(model_dir),
            "--dataset",
            str(tmp_path),
            "--attn_implementation",
            "flex",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("train.py: error: --attn_implementation flex cannot train on CPU")
    ), proc.stderr


def _docs(length=300):
    """Rows of several documents (one spanning a 128-token block boundary), the padding tail its own document."""
    return torch.tensor([[0] * 100 + [1] * 150 + [2] * (length - 250), [0] * 7 + [1] * (length - 7)])


def test_flex_document_mask_is_the_dense_block_causal_mask():
    from torch.nn.attention.flex_attention import create_mask

    docs = _docs()
    bm = attention.block_mask(docs)
    dense = create_mask(bm.mask_mod, docs.shape[0], 1, docs.shape[1], docs.shape[1], device="cpu")
    assert torch.equal(dense, block_causal_mask(docs, torch.float32) == 0)
    full_blocks = -(-docs.shape[1] // 128)
    assert int(bm.kv_num_blocks.sum()) < docs.shape[0] * full_blocks * full_blocks  # sparse: blocks skipped
    windowed = attention.block_mask(docs, window=16)  # Mistral's sliding window, carried by both masks
    dense = create_mask(windowed.mask_mod, docs.shape[0], 1, docs.shape[1], docs.shape[1], device="cpu")
    expected = block_causal_mask(docs, torch.float32, window=16) == 0
    assert torch.equal(dense, expected) and int(expected.sum()) < int(
        (block_causal_mask(docs, torch.float32) == 0).sum()
    )


def test_flex_forward_matches_dense_sdpa(model_dir):
    """FlexAttention's forward (eager: compiled flex has no CPU kernel with return_lse) through the real model, with
    the BlockMask the hook builds, equals SDPA with the dense block-causal mask."""
    ref = attention.install(AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa"), "sdpa")
    flex = attention.install(
        AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="flex_attention"), "flex"
    )
    inputs = _packed_batch(ref.config.vocab_size, length=32)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        want, got = ref(**inputs), flex(**inputs)
    torch.testing.assert_close(got.loss, want.loss, **TOL)
    torch.testing.assert_close(got.logits, want.logits, **TOL)
    with torch.no_grad():  # and the mask matters: without it the documents see each other
        unmasked = ref(**{k: v for k, v in inputs.items() if k != "document_ids"}).loss
    assert abs(float(unmasked) - float(want.loss)) > 1e-4


def test_flash_flattened_rows_keep_the_loss(model_dir):
    """flash gets the rows as one row with restarting positions: with the same documents kept apart (here by the
    dense mask over the flat row) the loss and gradients are those of the batch."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    inputs = _packed_batch(model.config.vocab_size, length=32)
    inputs["labels"][1, 0] = 5  # never predicted in its row (the shift), so not once flattened either
    flat = attention.packed_inputs("flash", dict(inputs))
    assert flat["input_ids"].shape == (1, 64) and "attention_mask" not in flat and "document_ids" not in flat
    assert torch.equal(flat["position_ids"], inputs["position_ids"].reshape(1, -1))
    flat_docs = (inputs["document_ids"] + 10 * torch.arange(2)[:, None]).reshape(1, -1)  # distinct per row
    flat["attention_mask"] = block_causal_mask(flat_docs, torch.float32)
    attention.install(model, "sdpa")
    want = model(**inputs).loss
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    got = model(**flat).loss
    torch.testing.assert_close(got, want, **TOL)
    for g, w in zip(torch.autograd.grad(got, list(model.parameters())), want_grads):
        torch.testing.assert_close(g, w, **TOL)


def test_model_inputs_and_the_sdpa_hook_give_the_block_causal_mask(model_dir):
    """What the trainer feeds (model_inputs: document_ids for packed rows only) reaches SDPA as the dense block-causal
    mask, in the dtype attention computes in."""
    from colossal_shear.train.batches import model_inputs

    inputs = _packed_batch(2048, length=32)
    batch = {**inputs, "segment_ids": inputs["document_ids"], "num_docs": torch.tensor([3, 2])}
    fed = model_inputs(batch, torch.float32, "cpu")
    assert torch.equal(fed["document_ids"], inputs["document_ids"]) and "attention_mask" not in fed
    assert "document_ids" not in model_inputs({**batch, "num_docs": torch.tensor([1, 1])}, torch.float32, "cpu")
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    explicit = {k: v for k, v in fed.items() if k != "document_ids"}
    explicit["attention_mask"] = block_causal_mask(fed["document_ids"], torch.float32)
    with torch.no_grad():
        want = model(**explicit).loss
        attention.install(model, "sdpa")
        got = model(**fed).loss
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got_bf16 = model(**fed).loss
    assert torch.equal(got, want)
    assert abs(float(got_bf16) - float(want)) < 0.05
