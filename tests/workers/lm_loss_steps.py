"""Worker for tests/test_lm_loss.py: under one Booster plugin, 3 fp32 training steps on a packed batch with the
model's own loss and then with the chunked loss (fresh model, plugin and optimizer each). Writes <out>/rank<R>.json:
both loss sequences and which loss path the boosted model ran."""

import argparse
import json
import os

import torch
import torch.distributed as dist


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--plugin", default="ddp")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--zero_stage", type=int, default=0)
    args = ap.parse_args()

    from colossalai.booster import Booster
    from transformers import AutoModelForCausalLM

    from colossal_shear.train import attention
    from colossal_shear.train.config import ParallelConfig
    from colossal_shear.train.distributed.launch import launch
    from colossal_shear.train.distributed.plugins import make_plugin
    from colossal_shear.train.losses import install_chunked_loss
    from colossal_shear.train.optim import make_optimizer
    from colossal_shear.train.trainer import _shutdown

    launch(seed=7)
    cfg = ParallelConfig(plugin=args.plugin, mixed_precision="fp32", tp=args.tp, zero_stage=args.zero_stage)
    rank = dist.get_rank()
    record = {"rank": rank}
    for variant in ("full", "chunked"):
        plugin = make_plugin(cfg)
        dp_rank = dist.get_rank(getattr(plugin, "dp_group", None))
        model = attention.install(
            AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32, attn_implementation="sdpa"),
            "sdpa",
        )
        if variant == "chunked":
            install_chunked_loss(model, chunk_tokens=7)
        g = torch.Generator().manual_seed(100 + dp_rank)
        ids = torch.randint(3, model.config.vocab_size, (2, 32), generator=g)
        docs = torch.tensor([[0] * 12 + [1] * 20, [0] * 25 + [1] * 7])
        pos = torch.tensor([list(range(12)) + list(range(20)), list(range(25)) + list(range(7))])
        labels = ids.clone()
        labels[pos == 0] = -100
        inputs = {"input_ids": ids, "labels": labels, "position_ids": pos, "document_ids": docs}
        optimizer = make_optimizer(model.parameters(), lr=1e-3)
        booster = Booster(plugin=plugin)
        model, optimizer, *_ = booster.boost(model, optimizer)
        losses = []
        for _ in range(3):
            out = model(**inputs)
            booster.backward(out.loss, optimizer)
            if args.plugin == "ddp":
                optimizer.clip_grad_by_norm(1.0)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(out.loss))
        record[variant] = losses
        if variant == "chunked":
            record["path"] = (
                "chunked"
                if getattr(out, "last_hidden_state", None) is not None and out.logits is None
                else "reference (shardformer forward)"
            )
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    del model, optimizer, booster, plugin, out
    _shutdown()


if __name__ == "__main__":
    main()
