"""Peak memory of a training step with the chunked LM loss against the model's own loss over full fp32 logits.

    python bench/lm_loss_memory.py          # Llama-3 vocabulary (128,256), 2 layers, hidden 64, untied head, zero2,
                                            # batch 2 × 2,048 tokens, on one CPU process
    python bench/lm_loss_memory.py --vocab 4096 --seq 128      # a quick look

Each variant runs in its own process (a world of one under the Booster, `--plugin` as train.py's), training
`--steps` steps on packed random tokens; the table gives its peak resident memory (ru_maxrss: the whole process,
imports included), the resident memory before the first step, and the ratio of the peaks. On a GPU (--device cuda)
the peak is torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import warnings
from pathlib import Path


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def worker(args) -> dict:
    import torch
    from colossalai.booster import Booster
    from transformers import LlamaConfig, LlamaForCausalLM

    from colossal_shear.train import attention
    from colossal_shear.train.config import ParallelConfig
    from colossal_shear.train.distributed.launch import launch
    from colossal_shear.train.distributed.plugins import make_plugin, model_dtype
    from colossal_shear.train.losses import install_chunked_loss
    from colossal_shear.train.optim import make_optimizer

    launch(seed=0)
    cfg = ParallelConfig(plugin=args.plugin, mixed_precision=args.precision)
    plugin = make_plugin(cfg)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=args.seq,
        tie_word_embeddings=False,
        use_cache=False,
    )
    torch.manual_seed(0)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", torch_dtype=model_dtype(cfg)).to(device)
    attention.install(model, "sdpa")
    if args.variant == "chunked":
        install_chunked_loss(model)
    optimizer = make_optimizer(model.parameters(), lr=1e-4)
    booster = Booster(plugin=plugin)
    model, optimizer, *_ = booster.boost(model, optimizer)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), device=device)
    half = args.seq // 2  # two documents per row: the dense block-causal mask, as packed data gets on CPU
    pos = torch.cat([torch.arange(half), torch.arange(args.seq - half)]).repeat(args.batch, 1).to(device)
    docs = (torch.arange(args.seq) >= half).long().repeat(args.batch, 1).to(device)
    labels = ids.clone()
    labels[pos == 0] = -100
    inputs = {"input_ids": ids, "labels": labels, "position_ids": pos, "document_ids": docs}
    before = _rss_gb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses = []
    for _ in range(args.steps):
        loss = model(**inputs).loss
        booster.backward(loss, optimizer)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else _rss_gb()
    return {"variant": args.variant, "peak_gb": peak, "before_gb": before, "losses": losses}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--plugin", default="zero2")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--variants", default="full,chunked", help="comma-separated: full, chunked")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # set in the worker processes
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.variant:
        from colossal_shear.train.trainer import _shutdown

        print("RESULT " + json.dumps(worker(args)), flush=True)
        _shutdown()  # colossalai's leftovers collected at interpreter exit can abort the process
        return
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    results = []
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"{variant} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        results.append(json.loads(line[len("RESULT ") :]))
    print(
        f"\nvocab {args.vocab:,}, {args.layers} layers, hidden {args.hidden}, untied head, {args.plugin} "
        f"{args.precision}, batch {args.batch} × {args.seq} tokens, {args.steps} steps, one process"
    )
    print("| LM loss | peak memory (GB) | resident before the first step (GB) | peak / full | losses |")
    print("|---|---|---|---|---|")
    full = next((r["peak_gb"] for r in results if r["variant"] == "full"), None)
    for r in results:
        ratio = f"{r['peak_gb'] / full:.2f}" if full else "n/a"
        print(
            f"| {r['variant']} | {r['peak_gb']:.2f} | {r['before_gb']:.2f} | {ratio} | "
            f"{', '.join(f'{x:.4f}' for x in r['losses'])} |"
        )


if __name__ == "__main__":
    main()
