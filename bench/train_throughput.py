"""Training throughput of the Booster path against plain PyTorch on the same model shape, in one run.

    python bench/train_throughput.py                          # 1.1B TinyLlama shape, seq 2048, zero2, on a GPU
    python bench/train_throughput.py --shape tiny --seq 128 --batch 4 --plugin ddp --precision fp32   # CPU smoke
    python bench/train_throughput.py --stage prune ...   # also the prune stage (masks on) against plain training
    torchrun --nproc_per_node 8 bench/train_throughput.py ... # several GPUs (the plain baselines run on rank 0 alone)

Prints one table: tokens/s, MFU (GPU) and the ratio to plain PyTorch eager for each row. Random weights and random
tokens (throughput does not depend on them); the first `--warmup` steps are not timed.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.distributed as dist

from colossal_shear.constants import DTYPES, PRECISIONS

SHAPES = {
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2048),
}


def make_model(shape: str, seq: int, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(max_position_embeddings=max(seq, 2048), attn_implementation="sdpa", use_cache=False,
                         **SHAPES[shape])
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype), config


def timed(step_fn, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step_fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step_fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def plain_step_fn(args, device, compiled: bool):
    model, _ = make_model(args.shape, args.seq, torch.float32)
    model.to(device)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=fused)
    fwd = torch.compile(model) if compiled else model
    data = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device)
    amp = args.precision != "fp32"

    def step():
        with torch.autocast(device.type, dtype=DTYPES[args.precision], enabled=amp):
            loss = fwd(input_ids=data, labels=data).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def booster_step_fn(args, device, prune: bool = False):
    from colossalai.booster import Booster

    from colossal_shear.train.plugins import ParallelConfig, make_optimizer, make_plugin

    cfg = ParallelConfig(plugin=args.plugin, mixed_precision=args.precision, tp=args.tp, pp=1)
    plugin = make_plugin(cfg)
    dtype = torch.float32 if args.plugin == "ddp" else DTYPES[args.precision]
    model, _ = make_model(args.shape, args.seq, dtype)
    if device.type == "cuda" and not args.plugin.startswith("gemini"):
        model.to(device)
    opt = make_optimizer(model.parameters(), lr=1e-4)
    booster = Booster(plugin=plugin)
    masks = lagrangian = mask_opt = None
    if prune:  # what train.py --stage prune adds to a step: sampled masks via hooks, the penalty, the mask update
        from colossal_shear.pruning.apply import MaskedModel
        from colossal_shear.pruning.lagrangian import Lagrangian
        from colossal_shear.pruning.masks import PruningMasks
        from colossal_shear.pruning.shape import PruneShape

        source = PruneShape.from_config(model.config)
        group = source.heads // source.kv_heads
        target = PruneShape(source.hidden * 3 // 4, source.kv_heads * max(1, group // 2), source.layers * 3 // 4,
                            source.intermediate * 2 // 3, source.kv_heads)
        masks = PruningMasks(model.config, target).to(device)
        lagrangian = Lagrangian(source, target, warmup_steps=10).to(device)
        mask_opt = torch.optim.AdamW(list(masks.parameters()) + list(lagrangian.parameters()), lr=1e-2)
        MaskedModel(model, lambda: masks.sample()).attach()
    model, opt, *_ = booster.boost(model, opt)
    data = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.batch, args.seq), device=device)
    amp = args.plugin == "ddp" and args.precision == "bf16"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = model(input_ids=data, labels=data).loss
            if masks is not None:
                loss = loss + lagrangian.penalty(masks.expected_per_layer(), 5)
        booster.backward(loss, opt)
        opt.step()
        opt.zero_grad()
        if masks is not None:
            grads = [p.grad for p in mask_opt.param_groups[0]["params"] if p.grad is not None]
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            for g, v in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(v.view_as(g))
            mask_opt.step()
            mask_opt.zero_grad()

    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tinyllama-1.1b", choices=SHAPES)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4, help="sequences per device per step")
    ap.add_argument("--plugin", default="zero2")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--precision", default="bf16", choices=PRECISIONS)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no_compile", action="store_true", help="skip the plain torch.compile baseline")
    ap.add_argument("--stage", default="continue", choices=("continue", "prune"),
                    help="prune: also time the Booster step with pruning masks on, against the plain Booster step")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    from colossal_shear.train.metrics import flops_per_token, peak_flops
    from colossal_shear.train.plugins import launch

    launch(seed=0)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    from transformers import LlamaConfig

    config = LlamaConfig(**SHAPES[args.shape])
    tokens = args.batch * args.seq
    fpt, peak = flops_per_token(config, args.seq), peak_flops()

    rows = []
    booster_s = timed(booster_step_fn(args, device), args.steps, args.warmup)
    rows.append((f"Booster {args.plugin} ({world} proc)", booster_s, tokens * world))
    if args.stage == "prune":
        prune_s = timed(booster_step_fn(args, device, prune=True), args.steps, args.warmup)
        rows.append((f"Booster {args.plugin} ({world} proc), prune stage", prune_s, tokens * world))
    if rank == 0:
        rows.append(("plain PyTorch eager", timed(plain_step_fn(args, device, False), args.steps, args.warmup), tokens))
        if not args.no_compile:
            rows.append(("plain PyTorch torch.compile",
                         timed(plain_step_fn(args, device, True), args.steps, args.warmup), tokens))
        base = tokens / next(secs for name, secs, _ in rows if name == "plain PyTorch eager")
        print(f"\nshape {args.shape}, seq {args.seq}, batch {args.batch}/device, {args.precision}, "
              f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
        print(f"| run | step time (s) | tokens/s per device | MFU | × plain eager |\n|---|---|---|---|---|")
        for name, secs, n in rows:
            per_device = n / secs / (world if name.startswith("Booster") else 1)
            mfu = f"{per_device * fpt / peak:.1%}" if peak else "n/a (CPU)"
            print(f"| {name} | {secs:.4f} | {per_device:,.0f} | {mfu} | {per_device / base:.2f} |")
        if args.stage == "prune":
            print(f"\nprune-stage step time / plain Booster step time: {prune_s / booster_s:.3f}x")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
