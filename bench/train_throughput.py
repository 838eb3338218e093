"""Training throughput of the Booster path against plain PyTorch (eager and torch.compile) on one model shape, in one
run, as one markdown table (`make gpu-check` prints it on a GPU machine).

    python bench/train_throughput.py                        # 1.1B TinyLlama shape, seq 2048, 4 sequences, bf16, GPU
    python bench/train_throughput.py --runs zero2,zero2+compile,plain+compile --batch 8
    python bench/train_throughput.py --dry_run              # the same runs on CPU at tiny sizes (the test suite)
    torchrun --nproc_per_node 8 bench/train_throughput.py ... # several GPUs (the plain baselines run on rank 0 alone)

Runs (--runs, comma-separated; all by default):
    plain, plain+compile     plain PyTorch: autocast, fused AdamW, the model's own loss (eager / torch.compile)
    zero2, zero2+compile     LowLevelZero stage 2 + HybridAdam, the chunked LM loss as train.py uses it (+ compile:
                             model.compile() before boosting, as train.py --compile)
    gemini, 3d               Gemini (static placement); HybridParallel (tp --tp, pp 1, ZeRO-1 in bf16/fp16)
    prune                    zero2 with what train.py --stage prune adds to a step: sampled L0 masks through hooks,
                             the mask update and its projection onto the target

Columns: tokens/s per device, MFU (GPU), peak memory (torch.cuda.max_memory_allocated per run on a GPU; on CPU the
process's peak resident memory so far) and the ratio to plain torch.compile (or plain eager when it is not run).
Random weights and tokens (throughput does not depend on them); the first --warmup steps are not timed. A run that
cannot work here (gemini on CPU) is a row with the reason.
"""

from __future__ import annotations

import argparse
import gc
import resource
import time
import warnings

import torch
import torch.distributed as dist

from colossal_shear.core.constants import DTYPES, PRECISIONS

SHAPES = {
    "tinyllama-1.1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "llama2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=2048,
    ),
}
RUNS = ("plain", "plain+compile", "zero2", "zero2+compile", "gemini", "3d", "prune")
DRY_RUN = dict(shape="tiny", seq=64, batch=2, steps=2, warmup=1, precision="fp32", compile_backend="aot_eager")


def make_model(shape: str, seq: int, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        max_position_embeddings=max(seq, 2048), attn_implementation="sdpa", use_cache=False, **SHAPES[shape]
    )
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
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    fwd = torch.compile(model, backend=args.compile_backend) if compiled else model
    data = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device)
    amp = args.precision != "fp32"

    def step():
        with torch.autocast(device.type, dtype=DTYPES[args.precision], enabled=amp):
            loss = fwd(input_ids=data, labels=data).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def booster_step_fn(args, device, plugin_name: str, compiled: bool = False, prune: bool = False):
    from colossalai.booster import Booster

    from colossal_shear.train.config import ParallelConfig
    from colossal_shear.train.distributed.plugins import make_plugin, model_dtype
    from colossal_shear.train.losses import install_chunked_loss
    from colossal_shear.train.optim import make_optimizer

    zero = 1 if plugin_name == "3d" and args.precision != "fp32" else 0
    cfg = ParallelConfig(
        plugin=plugin_name, mixed_precision=args.precision, tp=args.tp if plugin_name == "3d" else 1, zero_stage=zero
    )
    plugin = make_plugin(cfg)
    model, _ = make_model(args.shape, args.seq, model_dtype(cfg))
    if device.type == "cuda" and not plugin_name.startswith("gemini"):
        model.to(device)
    if args.lm_loss == "chunked":
        install_chunked_loss(model)
    opt = make_optimizer(model.parameters(), lr=1e-4)
    booster = Booster(plugin=plugin)
    masks = constraint = mask_opt = None
    if prune:  # what train.py --stage prune adds to a step: sampled masks via hooks, the mask update, the projection
        from colossal_shear.pruning.constraint import ShapeConstraint
        from colossal_shear.pruning.masked_model import MaskedModel
        from colossal_shear.pruning.masks import PruningMasks
        from colossal_shear.pruning.shape import PruneShape

        source = PruneShape.from_config(model.config)
        group = source.heads // source.kv_heads
        target = PruneShape(
            source.hidden * 3 // 4,
            source.kv_heads * max(1, group // 2),
            source.layers * 3 // 4,
            source.intermediate * 2 // 3,
            source.kv_heads,
        )
        masks = PruningMasks(model.config, target).to(device)
        constraint = ShapeConstraint(masks, ramp_steps=10)
        mask_opt = torch.optim.AdamW(list(masks.parameters()), lr=1e-2)
        MaskedModel(model, lambda: masks.sample()).attach()
    if compiled:  # as train.py --compile: before boosting
        model.compile(backend=args.compile_backend)
    model, opt, *_ = booster.boost(model, opt)
    data = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.batch, args.seq), device=device)
    amp = plugin_name == "ddp" and args.precision == "bf16"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = model(input_ids=data, labels=data).loss
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
            constraint.project(masks, 5)

    return step


def _why_not(run: str, device) -> str | None:
    from colossal_shear.train.distributed.plugins import CUDA_ONLY

    plugin = run.split("+")[0]
    if plugin in CUDA_ONLY and device.type != "cuda":
        return f"skipped: {CUDA_ONLY[plugin]}"
    return None


def _peak_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(run: str, args, device, rank: int):
    """(seconds per step, peak GB) of one run, or the reason it was not run; frees what it built."""
    reason = _why_not(run, device)
    if reason:
        return reason
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    compiled = run.endswith("+compile")
    if run.startswith("plain"):
        if rank != 0:
            return None
        step = plain_step_fn(args, device, compiled)
    else:
        plugin = "zero2" if run == "prune" else run.split("+")[0]
        step = booster_step_fn(args, device, plugin, compiled=compiled, prune=run == "prune")
    secs = timed(step, args.steps, args.warmup)
    peak = _peak_gb(device)
    del step
    gc.collect()
    return secs, peak


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tinyllama-1.1b", choices=SHAPES)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4, help="sequences per device per step")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of: {', '.join(RUNS)}")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the 3d run")
    ap.add_argument("--precision", default="bf16", choices=PRECISIONS)
    ap.add_argument("--lm_loss", default="chunked", choices=("chunked", "full"), help="the Booster runs' LM loss")
    ap.add_argument("--compile_backend", default="inductor")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--dry_run",
        action="store_true",
        help="tiny sizes on whatever device is here: " + ", ".join(f"{k}={v}" for k, v in DRY_RUN.items()),
    )
    args = ap.parse_args()
    if args.dry_run:
        for key, value in DRY_RUN.items():
            setattr(args, key, value)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        ap.error(f"--runs: unknown {', '.join(unknown)} (choose from {', '.join(RUNS)})")
    warnings.filterwarnings("ignore")

    from transformers import LlamaConfig

    from colossal_shear.train.distributed.launch import launch
    from colossal_shear.train.io.metrics import flops_per_token, peak_flops

    launch(seed=0)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    tokens = args.batch * args.seq
    fpt, peak = flops_per_token(LlamaConfig(**SHAPES[args.shape]), args.seq), peak_flops()

    results = {}
    for run in runs:
        started = time.perf_counter()
        results[run] = measure(run, args, device, rank)
        if rank == 0:
            print(f"{run}: done in {time.perf_counter() - started:.0f} s", flush=True)
    if rank == 0:
        print(table(results, args, device, world, tokens, fpt, peak))
    dist.barrier()
    dist.destroy_process_group()


def table(results: dict, args, device, world: int, tokens: int, fpt: float, peak: float | None) -> str:
    timed_runs = {r: v for r, v in results.items() if isinstance(v, tuple)}
    base_name = "plain+compile" if "plain+compile" in timed_runs else "plain" if "plain" in timed_runs else None
    base = tokens / timed_runs[base_name][0] if base_name else None
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    lines = [
        f"\nshape {args.shape}, seq {args.seq}, batch {args.batch}/device, {args.precision}, {world} process(es), "
        f"device {name}, torch {torch.__version__}, Booster LM loss {args.lm_loss}",
        f"| run | step time (s) | tokens/s per device | MFU | peak memory (GB) | × {base_name or 'n/a'} |",
        "|---|---|---|---|---|---|",
    ]
    for run, value in results.items():
        if isinstance(value, str):
            lines.append(f"| {run} | {value} | | | | |")
        elif value is not None:
            secs, peak_gb = value
            per_device = tokens / secs
            mfu = f"{per_device * fpt / peak:.1%}" if peak else "n/a (CPU)"
            ratio = f"{per_device / base:.2f}" if base else "n/a"
            lines.append(f"| {run} | {secs:.4f} | {per_device:,.0f} | {mfu} | {peak_gb:.2f} | {ratio} |")
    if "prune" in timed_runs and "zero2" in timed_runs:
        lines.append(
            f"\nprune-stage step time / zero2 step time: {timed_runs['prune'][0] / timed_runs['zero2'][0]:.3f}x"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
