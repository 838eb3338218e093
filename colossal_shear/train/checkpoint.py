"""Resumable checkpoints and plain Hugging Face exports.

A checkpoint is `<save_dir>/step-NNNNNNN/` holding the Booster's sharded model and optimizer, `trainer_state.pt`
(step, scheduler, counters: the same on every rank) and `rank-R.pt` per rank (its RNG state and data position:
samplers that draw per rank differ between ranks). It is written into `.tmp-step-NNNNNNN`
and renamed when every rank has finished; the `latest` pointer is replaced last, so a crash at any moment leaves
the previous checkpoint usable. Only the newest `keep_last` are kept. `save_dir` must be visible to every node.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

LATEST = "latest"


def is_hf_model_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and not (p / "trainer_state.pt").exists() and not (p / LATEST).exists()


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a save_dir (then its `latest`)."""
    p = Path(path)
    if (p / "trainer_state.pt").is_file():
        return p
    if (p / LATEST).is_file():
        name = (p / LATEST).read_text().strip()
        if (p / name / "trainer_state.pt").is_file():
            return p / name
        raise FileNotFoundError(f"{p / LATEST} names {name!r}, which is not a complete checkpoint")
    raise FileNotFoundError(f"--load_checkpoint {p}: neither a checkpoint (trainer_state.pt), a save_dir with a "
                            f"'{LATEST}' pointer, nor a Hugging Face model directory (config.json)")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _replace_file(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(booster, model, optimizer, save_dir: str | os.PathLike, step: int, trainer_state: dict,
                    rank_state: dict, keep_last: int = 2) -> Path:
    save_dir = Path(save_dir)
    name = f"step-{step:07d}"
    final, tmp = save_dir / name, save_dir / f".tmp-{name}"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    tied = bool(getattr(_config_of(model), "tie_word_embeddings", False))
    booster.save_model(model, str(tmp / "model"), shard=True, use_safetensors=not tied)  # tied weights share memory
    booster.save_optimizer(optimizer, str(tmp / "optimizer"), shard=True)
    torch.save({"rng": rng_state(), **rank_state}, tmp / f"rank-{rank}.pt")
    if rank == 0:
        torch.save(trainer_state, tmp / "trainer_state.pt")
    dist.barrier()
    if rank == 0:
        if final.exists():  # the same step saved again (e.g. at the end after an interval save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _replace_file(save_dir / LATEST, name)
        old = sorted(p for p in save_dir.glob("step-*") if p.is_dir())[:-keep_last] if keep_last > 0 else []
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
    dist.barrier()
    return final


def _config_of(model):
    inner = model.unwrap() if hasattr(model, "unwrap") else model
    return getattr(inner, "config", None)


def load_checkpoint(booster, model, optimizer, path: Path) -> tuple[dict, dict]:
    """Restore model, optimizer and this rank's RNG; return (trainer state, this rank's state)."""
    booster.load_model(model, str(path / "model"))
    booster.load_optimizer(optimizer, str(path / "optimizer"))
    rank_file = path / f"rank-{dist.get_rank()}.pt"
    if not rank_file.is_file():
        raise FileNotFoundError(f"{rank_file} is missing: the checkpoint was written by a run with fewer ranks")
    rank_state = torch.load(rank_file, weights_only=True)
    set_rng_state(rank_state.pop("rng"))
    return torch.load(path / "trainer_state.pt", weights_only=True), rank_state


def export_hf(booster, model, out_dir: str | os.PathLike, config, tokenizer, dtype: torch.dtype,
              overwrite: bool = False, transform=None) -> Path:
    """Write a plain Hugging Face directory (safetensors, config.json, tokenizer) that
    `AutoModelForCausalLM.from_pretrained` loads with no custom code, atomically (temporary dir, then rename).

    Every plugin can write full weights through the Booster, but not as safetensors when embeddings are tied (they
    share memory): so the Booster writes torch shards to a scratch directory, and rank 0 loads them into a plain HF
    model, applies `transform` (e.g. folding pruning masks), and saves it with `save_pretrained`.
    """
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    scratch, tmp = out.with_name(f".tmp-full-{out.name}"), out.with_name(f".tmp-{out.name}")
    rank = dist.get_rank()
    if rank == 0:
        for p in (scratch, tmp):
            shutil.rmtree(p, ignore_errors=True)
        scratch.mkdir(parents=True)
    dist.barrier()
    booster.save_model(model, str(scratch), shard=True, use_safetensors=False, size_per_shard=4096)
    dist.barrier()
    if rank == 0:
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
        if out.exists():
            if not overwrite and any(out.iterdir()):
                raise FileExistsError(f"export_dir {out} exists and is not empty (pass --overwrite)")
            old = out.with_name(f".old-{out.name}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    dist.barrier()
    return out
