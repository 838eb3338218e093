"""The plain Hugging Face export of a trained model (every stage ends with one)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from colossal_shear.core.fsutil import publish_dir
from colossal_shear.train.io.checkpoint import attempt, raise_agreed


def export_hf(
    booster,
    model,
    out_dir: str | os.PathLike,
    config,
    tokenizer,
    dtype: torch.dtype,
    overwrite: bool = False,
    transform=None,
) -> Path:
    """Write a plain Hugging Face directory (safetensors, config.json, tokenizer) that
    `AutoModelForCausalLM.from_pretrained` loads with no custom code, atomically (temporary dir, then rename).

    Every plugin can write full weights through the Booster, but not as safetensors when embeddings are tied (they
    share memory): so the Booster writes torch shards to a scratch directory, and rank 0 loads them into a plain HF
    model, applies `transform` (e.g. folding pruning masks), and saves it with `save_pretrained`.
    """
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    scratch, tmp = out.with_name(f".tmp-full-{out.name}"), out.with_name(f".tmp-{out.name}")
    rank, what = dist.get_rank(), f"exporting to {out}"

    def remove_tmp():
        for p in (scratch, tmp):
            shutil.rmtree(p, ignore_errors=True)

    def fresh_dir():
        if rank == 0:
            remove_tmp()
            scratch.mkdir(parents=True)

    def convert():
        if rank != 0:
            return
        config.save_pretrained(scratch)
        hf = AutoModelForCausalLM.from_pretrained(scratch, torch_dtype=torch.float32 if transform else dtype)
        if transform is not None:
            hf = transform(hf)
        hf = hf.to(dtype)
        hf.config.torch_dtype = dtype
        hf.config.use_cache = True
        hf.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(scratch)
        publish_dir(tmp, out, overwrite=overwrite)

    raise_agreed(attempt(fresh_dir)[1], what, scratch, remove_tmp)
    full_weights = lambda: booster.save_model(
        model,
        str(scratch),
        shard=True,
        use_safetensors=False,  # noqa: E731
        size_per_shard=4096,
    )
    raise_agreed(attempt(full_weights)[1], what, scratch, remove_tmp)
    raise_agreed(attempt(convert)[1], what, tmp, remove_tmp)
    return out
