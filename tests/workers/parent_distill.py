"""Worker for tests/test_prune_stage.py: distillation from the parent (--teacher parent) under real Booster plugins.

Per variant (plugin, LM loss, activation checkpointing, lm_weight), a fresh tiny model with fixed pruning gates, some
closed, attached as the prune stage attaches them; boosted with SGD (lr 1, no clipping: the update is the gradient).
Every rank takes the same batch. Writes <out>/rank<R>.json with, per variant:
  kl_open      the hook's KL term with every gate open (the parent is then the student: 0)
  kl, kl_ref   the hook's KL term with the gates, and the same by hand from full logits (unmasked vs masked model)
  update_err   max |update - reference gradient| of one engine step, the reference being lm_weight x LM + kd_weight x
               KL on a plain copy of the model, by hand; grad_max: max |reference gradient| (the scale)
  lm_logged    the LM loss the engine returned, and lm_ref: the masked model's cross-entropy by hand
"""

import argparse
import copy
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

VARIANTS = (
    {"plugin": "ddp", "lm_loss": "chunked", "checkpointing": True, "lm_weight": 0.0},
    {"plugin": "zero2", "lm_loss": "full", "checkpointing": False, "lm_weight": 0.5},
)
KD_WEIGHT, T = 2.0, 1.5


def gates(config) -> dict:
    """Gates with some units closed and some partly open (the same on every rank)."""
    g = torch.Generator().manual_seed(3)
    L, H, d, F_ = config.num_hidden_layers, config.num_attention_heads, config.hidden_size, config.intermediate_size
    hidden = torch.ones(d)
    hidden[:8] = 0
    head = torch.ones(L, H)
    head[:, 1] = 0
    inter = torch.rand(L, F_, generator=g)
    inter[inter < 0.25] = 0
    return {"hidden": hidden, "layer": torch.tensor([1.0, 0.7, 0.0, 1.0])[:L], "head": head, "intermediate": inter}


def batch(vocab: int) -> dict:
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, vocab, (2, 24), generator=g)
    docs = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
    pos = torch.tensor([list(range(10)) + list(range(14)), list(range(24))])
    labels = ids.clone()
    labels[pos == 0] = -100
    labels[1, 20:] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "document_ids": docs}


def reference(model, z, inputs, lm_weight):
    """By hand, on a plain copy: KL(softmax(unmasked / T) || softmax(masked / T)) x T^2 over the labelled positions,
    the masked cross-entropy, and the gradient of lm_weight x CE + KD_WEIGHT x KL."""
    from colossal_shear.pruning.masked_model import MaskedModel

    plain = {k: v for k, v in inputs.items() if k != "labels"}
    model.zero_grad()
    with torch.no_grad():
        teacher = model(**plain).logits
    with MaskedModel(model, lambda: z):
        student = model(**plain).logits
    keep = inputs["labels"][:, 1:] != -100
    log_s = torch.log_softmax(student[:, :-1][keep] / T, dim=-1)
    log_t = torch.log_softmax(teacher[:, :-1][keep] / T, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean() * T**2
    ce = F.cross_entropy(student[:, :-1][keep], inputs["labels"][:, 1:][keep])
    (lm_weight * ce + KD_WEIGHT * kl).backward()
    return float(kl), float(ce), {n: p.grad.clone() for n, p in model.named_parameters()}


def run_variant(model_dir: str, v: dict) -> dict:
    from colossalai.booster import Booster
    from transformers import AutoModelForCausalLM

    from colossal_shear.pruning.masked_model import MaskedModel
    from colossal_shear.train import attention
    from colossal_shear.train.config import DistillConfig, ParallelConfig
    from colossal_shear.train.distributed.plugins import make_plugin
    from colossal_shear.train.engine import make_engine
    from colossal_shear.train.losses import install_chunked_loss
    from colossal_shear.train.stages.base import HookList
    from colossal_shear.train.stages.distill import ParentDistillation

    model = attention.install(
        AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="sdpa"), "sdpa"
    )
    plain = copy.deepcopy(model)
    if v["lm_loss"] == "chunked":
        install_chunked_loss(model, chunk_tokens=7)
    if v["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    z, current = gates(model.config), {}
    masked = MaskedModel(model, lambda: current["z"]).attach()
    par = ParallelConfig(plugin=v["plugin"], mixed_precision="fp32")
    booster = Booster(plugin=make_plugin(par, max_norm=0.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    boosted, optimizer, *_ = booster.boost(model, torch.optim.SGD(model.parameters(), lr=1.0))
    engine = make_engine(booster, par, 0.0, torch.device("cpu"), True)
    cfg = DistillConfig(teacher="parent", kd_weight=KD_WEIGHT, kd_temperature=T, lm_weight=v["lm_weight"])
    hooks = HookList([ParentDistillation(cfg, masked, lambda: boosted, 1)])
    inputs = batch(model.config.vocab_size)
    out = {}
    for name, gate in (("kl_open", {k: torch.ones_like(t) for k, t in z.items()}), ("kl", z)):
        current["z"] = gate
        with torch.no_grad():
            out[name] = float(hooks.extra_loss(0, inputs, boosted(**inputs))) / KD_WEIGHT
    lm, _ = engine.forward_backward(boosted, optimizer, inputs, 1.0, hooks, 0, True)
    engine.optimizer_step(boosted, optimizer)
    out["kl_ref"], out["lm_ref"], grads = reference(plain, z, inputs, v["lm_weight"])
    out["lm_logged"] = float(lm)
    after = dict(masked.model.named_parameters())
    out["update_err"] = max(float((before[n] - after[n].detach() - g).abs().max()) for n, g in grads.items())
    out["grad_max"] = max(float(g.abs().max()) for g in grads.values())
    out["z_kept"] = masked.z is current["z"]  # the student's gates are back after the parent's forward
    masked.detach()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from colossal_shear.train.distributed.launch import launch
    from colossal_shear.train.trainer import _shutdown

    launch(seed=7)
    record = {"rank": dist.get_rank(), "variants": [{**v, **run_variant(args.model, v)} for v in VARIANTS]}
    with open(os.path.join(args.out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(record, f)
    _shutdown()


if __name__ == "__main__":
    main()
