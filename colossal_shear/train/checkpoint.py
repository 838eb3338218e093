"""Resumable checkpoints and plain Hugging Face exports.

A checkpoint is `<save_dir>/step-NNNNNNN/` holding the Booster's sharded model and optimizer, `trainer_state.pt`
(counters, schedule, stage hooks: the same on every rank) and `rank-R.pt` per rank (its RNG state and data
position: samplers that draw per rank differ between ranks). It is written into `.tmp-step-NNNNNNN`
and renamed when every rank has finished; the `latest` pointer is replaced last, so a crash at any moment leaves
the previous checkpoint usable. Only the newest `keep_last` are kept. `save_dir` must be visible to every node.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from colossal_shear.errors import UserError
from colossal_shear.fsutil import atomic_write_text, publish_dir

LATEST = "latest"
TRAINER_STATE, RANK_STATE = "trainer_state.pt", "rank-{rank}.pt"


def is_hf_model_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and not (p / TRAINER_STATE).exists() and not (p / LATEST).exists()


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a save_dir (then its `latest`)."""
    p = Path(path)
    if (p / TRAINER_STATE).is_file():
        return p
    if (p / LATEST).is_file():
        name = (p / LATEST).read_text().strip()
        if (p / name / TRAINER_STATE).is_file():
            return p / name
        raise CheckpointError(f"{p / LATEST} names {name!r}, which is not a complete checkpoint")
    raise CheckpointError(f"--load_checkpoint {p}: neither a checkpoint ({TRAINER_STATE}), a save_dir with a "
                          f"'{LATEST}' pointer, nor a Hugging Face model directory (config.json)")


class CheckpointError(UserError):
    def __init__(self, message: str, rank_local: bool = False):
        super().__init__(message)
        self.rank_local = rank_local  # met by one rank only: that rank prints it


def _load_state(path: Path, rank_local: bool = False) -> dict:
    """A state file of a checkpoint, tensors only; a truncated or corrupted one is an error naming it."""
    try:
        return torch.load(path, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint state file ({reason})", rank_local) from None


class RNGState:
    """This rank's random generators, as a stateful component."""

    def state_dict(self) -> dict:
        state = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    """The checkpoint policy (every `interval` steps and at the end, the newest `keep_last` kept, `latest` replaced
    last) and its contents: the Booster's sharded model and optimizer, plus every registered stateful component
    (`state_dict`/`load_state_dict`): shared ones in `trainer_state.pt` (the same on every rank, written by rank 0)
    and per-rank ones in `rank-R.pt` (RNG, data position)."""

    def __init__(self, booster, model, optimizer, save_dir: str | None, interval: int, keep_last: int):
        self.booster, self.model, self.optimizer = booster, model, optimizer
        self.save_dir = Path(save_dir) if save_dir else None
        self.interval, self.keep_last = interval, keep_last
        self.shared: dict = {}
        self.per_rank: dict = {}
        self.last_saved: int | None = None

    def register(self, name: str, component, per_rank: bool = False) -> None:
        (self.per_rank if per_rank else self.shared)[name] = component

    def due(self, step: int) -> bool:
        return bool(self.save_dir and self.interval and step % self.interval == 0)

    def save_final(self, step: int) -> None:
        if self.save_dir and self.last_saved != step:
            self.save(step)

    def save(self, step: int) -> Path:
        name = f"step-{step:07d}"
        final, tmp = self.save_dir / name, self.save_dir / f".tmp-{name}"
        rank = dist.get_rank()
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        tied = bool(getattr(_config_of(self.model), "tie_word_embeddings", False))
        # tied weights share memory, which safetensors refuses: torch shards then
        self.booster.save_model(self.model, str(tmp / "model"), shard=True, use_safetensors=not tied)
        self.booster.save_optimizer(self.optimizer, str(tmp / "optimizer"), shard=True)
        torch.save({k: c.state_dict() for k, c in self.per_rank.items()}, tmp / RANK_STATE.format(rank=rank))
        if rank == 0:
            torch.save({k: c.state_dict() for k, c in self.shared.items()}, tmp / TRAINER_STATE)
        dist.barrier()
        if rank == 0:
            publish_dir(tmp, final, overwrite=True)  # the same step may be saved again
            atomic_write_text(self.save_dir / LATEST, name)
            old = sorted(p for p in self.save_dir.glob("step-*") if p.is_dir())
            for p in old[:-self.keep_last] if self.keep_last > 0 else []:
                shutil.rmtree(p, ignore_errors=True)
        dist.barrier()
        self.last_saved = step
        return final

    def resume(self, path: str | os.PathLike) -> Path:
        """Restore the model, the optimizer and every registered component from a checkpoint (or a save_dir's
        latest)."""
        path = resolve_checkpoint(path)
        rank_file = path / RANK_STATE.format(rank=dist.get_rank())
        if not rank_file.is_file():
            raise CheckpointError(f"{rank_file} is missing: the checkpoint was written by a run with fewer ranks",
                                  rank_local=True)
        shared, mine = _load_state(path / TRAINER_STATE), _load_state(rank_file, rank_local=True)
        self.booster.load_model(self.model, str(path / "model"))
        self.booster.load_optimizer(self.optimizer, str(path / "optimizer"))
        for states, components in ((shared, self.shared), (mine, self.per_rank)):
            for name, component in components.items():
                component.load_state_dict(states[name])
        self.last_saved = None
        return path


def _config_of(model):
    inner = model.unwrap() if hasattr(model, "unwrap") else model
    return getattr(inner, "config", None)


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
        publish_dir(tmp, out, overwrite=overwrite)
    dist.barrier()
    return out
