#!/usr/bin/env python3
"""Embedding resize: vectorised (colossal_shear.embeddings) vs per-token concatenation (Colossal-LLaMA-2), same run.

The case of the Colossal-LLaMA-2 recipe: a 32,000 x 4,096 input embedding and an untied LM head grown by 37,104
rows (LLaMA-2 -> 69,104 pieces), each new row the mean of the rows of 2-4 sub-pieces (synthetic, seeded ids).

- vectorised: `make_plan` + `resize_matrix` on both matrices (one allocation each, one indexed copy of the old
  block, new rows by `embedding_bag` in chunks, padding to a multiple of 64);
- per-token: for every new token, mean its rows and `torch.cat` it to the matrix, for the embedding and the head,
  as the published `init_model.py` does (it used `np.concatenate`; same copying). Each step copies the whole
  matrix, so the total is O(V^2). On a small machine the full run takes hours: by default only the first
  `--naive_rows` new rows are timed and the total is extrapolated with cost proportional to the rows copied
  (sum over steps of the matrix size), which the table says. `--naive_rows 0` runs it in full.
The rows both approaches produce for the timed tokens are compared.

`--memory` measures the other requirement, peak memory of `tokenizer/init_model.py` as a separate process: a bf16
Llama (default 0.94B parameters, Mistral-7B's 32,000-piece tokenizer, fetched by colossal_shear.assets_fetch) grown
by jieba's 20,000 most frequent words, and the same arithmetic scaled to LLaMA-2-7B (13.5 GB in bf16).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from colossal_shear.vocab.resize import make_plan, resize_matrix  # noqa: E402


def naive_grow(emb: torch.Tensor, head: torch.Tensor, subs: list[list[int]], steps: int):
    """The per-token approach on the first `steps` new tokens; returns (time per step list, emb, head)."""
    times = []
    src_emb, src_head = emb, head
    for ids in subs[:steps]:
        t0 = time.perf_counter()
        idx = torch.tensor(ids)
        e_row = src_emb[idx].mean(dim=0).unsqueeze(0)
        h_row = src_head[idx].mean(dim=0).unsqueeze(0)
        emb = torch.cat([emb, e_row], dim=0)
        head = torch.cat([head, h_row], dim=0)
        times.append(time.perf_counter() - t0)
    return times, emb, head


def memory(a) -> int:
    """Peak RSS of init_model.py on a real-shaped bf16 model; the overhead beyond weights + new matrices is then
    added to a 7B model's sizes."""
    import json
    import resource
    import subprocess
    import tempfile

    import assets_fetch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.modeling_utils import no_init_weights

    from colossal_shear.vocab import TokenizerConfig, init_tokenizer

    root = Path(tempfile.mkdtemp(prefix="resize-mem-"))
    tok_dir = assets_fetch.mistral_tokenizer_dir()
    words = root / "words.jsonl"
    words.write_text(
        "".join(json.dumps({"piece": w}, ensure_ascii=False) + "\n" for w in assets_fetch.jieba_words(20000)),
        encoding="utf-8",
    )
    init_tokenizer(TokenizerConfig(tok_dir, root / "tok", expand_tokens_file=words, progress=False))
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=a.mem_hidden,
        intermediate_size=a.mem_intermediate,
        num_hidden_layers=a.mem_layers,
        num_attention_heads=a.mem_hidden // 128,
        num_key_value_heads=a.mem_hidden // 128,
        torch_dtype="bfloat16",
    )
    torch.set_default_dtype(torch.bfloat16)
    with no_init_weights():
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    for prm in model.parameters():
        prm.data.normal_(0, 0.02)
    n_params = sum(prm.numel() for prm in model.parameters())
    model.save_pretrained(root / "src")
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(root / "src")
    del model
    cmd = [
        sys.executable,
        str(Path(__file__).resolve().parent.parent / "tokenizer" / "init_model.py"),
        "--source_model_and_tokenizer_path",
        str(root / "src"),
        "--target_tokenizer_path",
        str(root / "tok"),
        "--target_model_path",
        str(root / "out"),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stderr)
        return 1
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    rows = json.loads((root / "out" / "config.json").read_text())["vocab_size"]
    model_bytes = 2 * n_params
    new_bytes = 2 * 2 * rows * a.mem_hidden
    overhead = peak - model_bytes - new_bytes
    b7, new7 = 2 * 6.74e9, 2 * 2 * 69120 * 4096
    print(f"# init_model.py memory | {datetime.date.today()} | {os.cpu_count()} CPUs | torch {torch.__version__}")
    print()
    print("| model | weights (bf16) | new embedding + head | peak RSS | wall |")
    print("|---|---:|---:|---:|---:|")
    print(
        f"| {n_params / 1e9:.2f}B, hidden {a.mem_hidden}, {a.mem_layers} layers, 32,000 -> {rows:,} rows | "
        f"{model_bytes / 1e9:.2f} GB | {new_bytes / 1e9:.2f} GB | {peak / 1e9:.2f} GB (measured) | {wall:.0f} s |"
    )
    print(
        f"| LLaMA-2-7B, 32,000 -> 69,120 rows | {b7 / 1e9:.2f} GB | {new7 / 1e9:.2f} GB | "
        f"{(b7 + new7 + overhead) / 1e9:.1f} GB (weights + new rows + the {overhead / 1e9:.2f} GB measured "
        f"overhead) | |"
    )
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--new_rows", type=int, default=37104)
    p.add_argument("--naive_rows", type=int, default=200, help="new rows to time per-token (0: all of them)")
    p.add_argument("--pad_to_multiple_of", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3, help="vectorised runs (best is reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory", action="store_true", help="measure init_model.py's peak memory instead (see above)")
    p.add_argument("--mem_hidden", type=int, default=2048)
    p.add_argument("--mem_layers", type=int, default=16)
    p.add_argument("--mem_intermediate", type=int, default=5504)
    a = p.parse_args(argv)
    if a.memory:
        return memory(a)

    g = torch.Generator().manual_seed(a.seed)
    emb = torch.randn(a.vocab, a.hidden, generator=g)
    head = torch.randn(a.vocab, a.hidden, generator=g)
    lengths = torch.randint(2, 5, (a.new_rows,), generator=g).tolist()
    flat = torch.randint(0, a.vocab, (sum(lengths),), generator=g).tolist()
    subs, pos = [], 0
    for n in lengths:
        subs.append(flat[pos : pos + n])
        pos += n

    best = float("inf")
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        plan = make_plan(
            {i: i for i in range(a.vocab)},
            a.vocab + a.new_rows,
            {a.vocab + j: s for j, s in enumerate(subs)},
            a.vocab,
            a.pad_to_multiple_of,
        )
        new_emb = resize_matrix(emb, plan)
        new_head = resize_matrix(head, plan)
        best = min(best, time.perf_counter() - t0)
    rows_out = new_emb.shape[0]

    steps = a.new_rows if a.naive_rows <= 0 else min(a.naive_rows, a.new_rows)
    times, n_emb, n_head = naive_grow(emb, head, subs, steps)
    measured = sum(times)
    check = (
        torch.allclose(n_emb[a.vocab :], new_emb[a.vocab : a.vocab + steps], atol=1e-5)
        and torch.allclose(n_head[a.vocab :], new_head[a.vocab : a.vocab + steps], atol=1e-5)
        and torch.equal(n_emb[: a.vocab], new_emb[: a.vocab])
    )
    del n_emb, n_head
    if steps == a.new_rows:
        naive_total, how = measured, "measured in full"
    else:
        copied = sum(a.vocab + i for i in range(steps))
        per_row = measured / copied
        total_rows = sum(a.vocab + i for i in range(a.new_rows))
        naive_total = per_row * total_rows
        how = f"first {steps:,} rows measured ({measured:.1f} s), extrapolated: cost proportional to rows copied"

    print(
        f"# Embedding resize: {a.vocab:,} x {a.hidden:,} embedding + untied LM head, +{a.new_rows:,} rows "
        f"(-> {rows_out:,} padded to {a.pad_to_multiple_of}), fp32"
    )
    print(
        f"# {datetime.date.today()} | {platform.platform()} | {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads) | python {platform.python_version()}"
    )
    print()
    print("| approach | time (s) | how |")
    print("|---|---:|---|")
    print(f"| vectorised (`resize_matrix`, both matrices) | {best:.2f} | best of {a.repeat} |")
    print(f"| per-token `torch.cat` (Colossal-LLaMA-2) | {naive_total:,.1f} | {how} |")
    print()
    print(f"speed-up: {naive_total / best:,.0f}x   (rows agree on the timed tokens: {'yes' if check else 'NO'})")
    return 0 if check else 1


if __name__ == "__main__":
    sys.exit(main())
