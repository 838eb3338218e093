"""Multi-process worker for tests/test_booster_cpu.py: real Booster training steps on a repeated batch.

Launched like users launch (`torchrun --nproc_per_node 2 …` or `colossalai run --nproc_per_node 2 …`). Each rank
writes `<out>/rank<R>.json`: its data-parallel coordinates, the loss of a plain (unboosted) forward on its batch,
the boosted losses per step, and a digest of its parameters after training.
"""

import argparse
import hashlib
import json
import os

import torch
import torch.distributed as dist


def batch_for(dp_rank: int, vocab: int, batch: int = 2, seq: int = 32) -> dict:
    g = torch.Generator().manual_seed(1000 + dp_rank)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def param_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--plugin", default="ddp")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--zero_stage", type=int, default=0)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--save_dir", default=None)
    args = ap.parse_args()

    from colossalai.booster import Booster
    from transformers import LlamaForCausalLM

    from colossal_shear.train.config import ParallelConfig
    from colossal_shear.train.distributed.launch import launch
    from colossal_shear.train.distributed.plugins import check_parallel_config, make_plugin
    from colossal_shear.train.optim import make_optimizer

    cfg = ParallelConfig(
        plugin=args.plugin,
        mixed_precision=args.precision,
        tp=args.tp,
        pp=args.pp,
        zero_stage=args.zero_stage,
        microbatch_size=1,
    )
    check_parallel_config(cfg)  # before any distributed work: gemini on a CPU-only run stops here
    launch(seed=1234)
    plugin = make_plugin(cfg)
    rank = dist.get_rank()
    dp_group = getattr(plugin, "dp_group", None)
    dp_rank = dist.get_rank(dp_group) if dp_group is not None else rank

    model = LlamaForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32, attn_implementation="sdpa")
    data = batch_for(dp_rank, model.config.vocab_size)
    with torch.no_grad():
        reference = model(**data).loss.item()
    optimizer = make_optimizer(model.parameters(), lr=args.lr)
    booster = Booster(plugin=plugin)
    model, optimizer, *_ = booster.boost(model, optimizer)

    losses = []
    for _ in range(args.steps):
        if args.pp > 1:
            out = booster.execute_pipeline(iter([data]), model, lambda o, _: o.loss, optimizer, return_loss=True)
            loss = out["loss"]
        else:
            loss = model(
                **{k: v.to(torch.cuda.current_device()) if torch.cuda.is_available() else v for k, v in data.items()}
            ).loss
            booster.backward(loss, optimizer)
        if args.plugin == "ddp":
            optimizer.clip_grad_by_norm(1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(None if loss is None else float(loss))

    if args.save_dir:
        booster.save_model(model, args.save_dir, shard=True)
    unwrapped = model.unwrap() if hasattr(model, "unwrap") else model
    record = {
        "rank": rank,
        "world": dist.get_world_size(),
        "dp_rank": dp_rank,
        "reference_loss": reference,
        "losses": losses,
        "digest": param_digest(unwrapped),
    }
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    dist.barrier()


if __name__ == "__main__":
    main()
