"""Training per model family: the loss our training path computes (the model `build_model` makes: chunked LM loss
in place of the HF loss, the attention kernel fed packed documents through a dense block-causal mask) equals the
model's own loss, each document run on its own through the stock Hugging Face model with its reference (eager)
attention; under every CPU plugin on 2 processes (zero2 for every family, ddp and 3d tp=2 where they add a case)
the trainer's logged losses are the plain model's on the same batches; `3d` refuses a family colossalai has no
shardformer policy for, before the process group starts."""

import dataclasses

import pytest
import torch
from conftest import FAMILIES, ROOT
from transformers import AutoConfig, AutoModelForCausalLM

from colossal_shear.train.config import TrainConfig
from colossal_shear.train.distributed.plugins import PluginError, check_parallel_config
from colossal_shear.train.model import build_model

# colossalai 0.5.0's shardformer has policies for these (llama.py, mistral.py, qwen2.py); the others are refused
SHARDFORMER_FAMILIES = ("llama", "llama3", "mistral", "qwen2")
WORKER = ROOT / "tests" / "workers" / "family_steps.py"
# Gemma 2's soft-capping (30 and 50) does not bite on a tiny random model's small logits: caps that do
BITING = {"gemma2": dict(attn_logit_softcapping=0.05, final_logit_softcapping=1.0)}


def _cfg(path, plugin="zero2", **parallel) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.pretrained = str(path)
    cfg.parallel = dataclasses.replace(cfg.parallel, plugin=plugin, mixed_precision="fp32", **parallel)
    return cfg


def packed_rows(vocab: int, seed: int = 0) -> dict:
    """Two rows of 48 tokens, three and two packed documents, positions restarting, -100 on each first token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 48), generator=g)
    docs = torch.tensor([[0] * 13 + [1] * 20 + [2] * 15, [0] * 30 + [1] * 18])
    pos = torch.cat([torch.cat([torch.arange((r == d).sum()) for d in r.unique()]) for r in docs]).view(2, -1)
    labels = ids.clone()
    labels[pos == 0] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "document_ids": docs}


def true_loss(path, batch):
    """Mean over labelled tokens of the stock model's own loss, each document on its own, eager attention; and
    that model."""
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    total, count = 0.0, 0
    for row in range(batch["input_ids"].shape[0]):
        for doc in batch["document_ids"][row].unique():
            keep = batch["document_ids"][row] == doc
            ids, labels = batch["input_ids"][row][keep][None], batch["labels"][row][keep][None]
            n = int((labels[:, 1:] != -100).sum())
            total = total + model(input_ids=ids, labels=labels).loss * n
            count += n
    return total / count, model


@pytest.mark.parametrize("family", FAMILIES)
def test_training_loss_is_the_models_own(family, family_model):
    """Final-logit soft-capping (Gemma 2), attention soft-capping (routed to eager), q/k norms, biases, fused
    projections, (1+w) norms and the embedding scale all reach the training loss; the gradient is the true one."""
    path = family_model(family, **BITING.get(family, {}))
    batch = packed_rows(AutoConfig.from_pretrained(path).vocab_size)
    model = build_model(_cfg(path), str(path))
    out = model(**batch)
    assert out.logits is None and out.last_hidden_state is not None, "the chunked loss did not replace the HF loss"
    reference, stock = true_loss(path, batch)
    torch.testing.assert_close(out.loss, reference, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    reference.backward()
    for name, p in stock.named_parameters():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in SHARDFORMER_FAMILIES])
def test_3d_refuses_a_family_without_a_shardformer_policy(family, family_model):
    config = AutoConfig.from_pretrained(family_model(family))
    with pytest.raises(PluginError) as err:
        check_parallel_config(_cfg("x", plugin="3d", tp=2).parallel, world_size=2, model_config=config)
    message = str(err.value)
    assert "\n" not in message and "no policy" in message and config.model_type in message
    assert "use --plugin zero2, zero2_cpu, ddp" in message


@pytest.mark.parametrize("family", SHARDFORMER_FAMILIES)
def test_3d_accepts_a_family_with_a_shardformer_policy(family, family_model):
    config = AutoConfig.from_pretrained(family_model(family))
    check_parallel_config(_cfg("x", plugin="3d", tp=2).parallel, world_size=2, model_config=config)
