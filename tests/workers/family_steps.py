"""Multi-process worker for tests/test_family_train.py: under one Booster plugin, for each model given (one model per
family, one launch for all of them), the model the trainer builds (`build_model`: chunked loss, packed documents)
takes STEPS fp32 training steps on this data-parallel rank's packed batch. Writes <out>/rank<R>.json: per model,
the data-parallel rank, the losses and which loss path ran."""

import argparse
import dataclasses
import json
import os

import torch
import torch.distributed as dist

STEPS, LR = 3, 3e-3


def packed_rows(vocab: int, seed: int = 0) -> dict:
    """Two rows of 48 tokens, three and two packed documents, positions restarting, -100 on each first token (the
    same number of labelled tokens whatever the seed, so the mean over ranks is the mean over their union)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 48), generator=g)
    docs = torch.tensor([[0] * 13 + [1] * 20 + [2] * 15, [0] * 30 + [1] * 18])
    pos = torch.cat([torch.cat([torch.arange((r == d).sum()) for d in r.unique()]) for r in docs]).view(2, -1)
    labels = ids.clone()
    labels[pos == 0] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "document_ids": docs}


def train_config(path, plugin: str, **parallel):
    from colossal_shear.train.config import TrainConfig

    cfg = TrainConfig()
    cfg.model.pretrained = str(path)
    cfg.parallel = dataclasses.replace(cfg.parallel, plugin=plugin, mixed_precision="fp32", **parallel)
    return cfg


def run_one(path: str, args) -> dict:
    from colossalai.booster import Booster

    from colossal_shear.train.distributed.plugins import make_plugin
    from colossal_shear.train.model import build_model
    from colossal_shear.train.optim import make_optimizer

    cfg = train_config(path, args.plugin, tp=args.tp)
    plugin = make_plugin(cfg.parallel)
    dp_group = getattr(plugin, "dp_group", None)
    dp_rank = dist.get_rank(dp_group) if dp_group is not None else dist.get_rank()
    model = build_model(cfg, path)
    batch = packed_rows(model.config.vocab_size, seed=dp_rank)
    optimizer = make_optimizer(model.parameters(), lr=LR)
    booster = Booster(plugin=plugin)
    model, optimizer, *_ = booster.boost(model, optimizer)
    losses = []
    for _ in range(STEPS):
        out = model(**batch)
        booster.backward(out.loss, optimizer)
        if args.plugin == "ddp":
            optimizer.clip_grad_by_norm(1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(out.loss))
    path_ran = "chunked" if getattr(out, "last_hidden_state", None) is not None else "shardformer"
    return {"dp_rank": dp_rank, "losses": losses, "path": path_ran}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", required=True, help="name=path,name=path,...")
    ap.add_argument("--out", required=True)
    ap.add_argument("--plugin", default="zero2")
    ap.add_argument("--tp", type=int, default=1)
    args = ap.parse_args()

    from colossal_shear.train.distributed.launch import launch
    from colossal_shear.train.trainer import _shutdown

    launch(seed=7)
    record = {}
    for item in args.models.split(","):
        name, path = item.split("=", 1)
        record[name] = run_one(path, args)
    with open(os.path.join(args.out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(record, f)
    _shutdown()


if __name__ == "__main__":
    main()
