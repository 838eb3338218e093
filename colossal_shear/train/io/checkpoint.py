"""Resumable, verified checkpoints and plain Hugging Face exports.

A checkpoint is `<save_dir>/step-NNNNNNN/` holding the Booster's sharded model and optimizer, `trainer_state.pt`
(counters, schedule, stage hooks: the same on every rank), `rank-R.pt` per rank (its RNG state and data
position: samplers that draw per rank differ between ranks) and `manifest.json`: the run's parallel layout (world
size, plugin, tp/pp/sp, ZeRO stage, data-parallel size) and every file's size and sha256. It is written into
`.tmp-step-NNNNNNN`, the manifest last, and renamed when every rank has finished; the `latest` pointer is replaced
after that, so a crash at any moment leaves the previous checkpoint usable. Only the newest `keep_last` are kept.
`save_dir` must be visible to every node.

Resuming checks before any collective load, on every rank, agreed between ranks (so one rank's problem is every
rank's error, never a hang): the layout matches, and every file matches the manifest (hashed in parallel, each rank
a share). `--load_checkpoint SAVE_DIR` takes the newest checkpoint that passes and says in one line what it skipped;
an explicit `step-N` directory that fails is an error naming the file. A write that fails while saving (a full
disk) is one error with the path and the OS reason on every rank; the temporary directory is removed. See
docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from colossal_shear.core.compat import save_keeping_os_reason
from colossal_shear.core.errors import UserError, os_errno
from colossal_shear.core.fsutil import atomic_write_text, file_digests, outside, publish_dir
from colossal_shear.core.logger import get_logger
from colossal_shear.train.config import CheckpointConfig
from colossal_shear.train.distributed.collective import gather
from colossal_shear.train.io.origin import mismatch

LATEST, MANIFEST = "latest", "manifest.json"
TRAINER_STATE, RANK_STATE = "trainer_state.pt", "rank-{rank}.pt"
log = get_logger(__name__)
STEP_DIR = re.compile(r"step-(\d+)")


def is_hf_model_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and not any((p / n).exists() for n in (TRAINER_STATE, MANIFEST, LATEST))


class CheckpointError(UserError):
    def __init__(self, message: str, rank_local: bool = False):
        super().__init__(message)
        self.rank_local = rank_local  # met by one rank only: that rank prints it


def layout(parallel, world_size: int, dp_size: int) -> dict:
    """What a checkpoint's shards and rank files depend on: a run resumes it only with the same."""
    return {
        "world_size": world_size,
        "plugin": parallel.plugin,
        "tp": parallel.tp,
        "pp": parallel.pp,
        "sp": parallel.sp,
        "zero_stage": parallel.zero_stage,
        "dp_size": dp_size,
    }


def _describe(lay: dict, keys) -> str:
    return ", ".join(f"{k} {lay.get(k)}" for k in keys)


def os_reason(error: BaseException) -> str | None:
    """The operating system's reason behind a failed write ("No space left on device"), if there is one."""
    number = os_errno(error)
    return os.strerror(number) if number else None


def attempt(fn, *args):
    """(result, None) or (None, the exception): a failure is kept to be agreed on, not raised at once."""
    try:
        return fn(*args), None
    except Exception as e:  # noqa: BLE001 (every failure must reach the other ranks)
        return None, e


def raise_agreed(error: Exception | None, what: str, where: Path, cleanup=None, note: str = "") -> None:
    """Agree on one step's failures. If any rank failed, rank 0 runs `cleanup` and every rank raises: one user
    error with the OS reason and the path for an I/O failure; anything else (a bug) is re-raised with its
    traceback on the rank that met it while the others name that rank."""
    mine = None
    if error is not None:
        reason = os_reason(error)
        mine = (
            (f"{reason} (in {where})", True)
            if reason
            else (f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}", False)
        )
    failed = [(rank, problem) for rank, problem in enumerate(gather(mine)) if problem is not None]
    if not failed:
        return
    if cleanup is not None and dist.get_rank() == 0:
        cleanup()
    if mine is not None and not mine[1]:
        raise error
    rank, (reason, io) = failed[0]
    raise CheckpointError((f"{what} failed: {reason}" if io else f"{what} failed on rank {rank}: {reason}") + note)


def _load_state(path: Path) -> dict:
    """A state file of a checkpoint, tensors only; a truncated or corrupted one is an error naming it."""
    try:
        return torch.load(path, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint state file ({reason})") from None


def _shares(sizes: dict[str, int], n: int) -> list[list[str]]:
    """Split files between n ranks by size (largest first to the least loaded), the same on every rank."""
    loads, shares = [0] * n, [[] for _ in range(n)]
    for rel in sorted(sizes, key=lambda r: (-sizes[r], r)):
        i = loads.index(min(loads))
        shares[i].append(rel)
        loads[i] += sizes[rel]
    return shares


def _step_of(path: Path) -> int:
    match = STEP_DIR.fullmatch(path.name)
    return int(match.group(1)) if match else -1


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
    """The checkpoint policy of the run's checkpoint section (every `save_interval` steps and at the end, the newest
    `keep_last` kept, `latest` replaced last) and its contents: the Booster's sharded model and optimizer, plus every
    registered stateful component (`state_dict`/`load_state_dict`): shared ones in `trainer_state.pt` (the same on
    every rank, written by rank 0) and per-rank ones in `rank-R.pt` (RNG, data position), and the manifest."""

    def __init__(self, cfg: CheckpointConfig, booster, model, optimizer, layout: dict, origin=None, job: str = ""):
        self.booster, self.model, self.optimizer = booster, model, optimizer
        self.save_dir = Path(cfg.save_dir) if cfg.save_dir else None
        self.interval, self.keep_last = cfg.save_interval, cfg.keep_last
        self.layout = layout  # recorded in each manifest; resuming needs the same
        self.origin = origin  # what the run is trained from (origin.py): recorded, and compared when resuming
        self.resumed_origin = None  # the origin of the checkpoint resumed, once resumed
        self.job = job  # this job's id (lock.py): its temporary directories are named after it
        self.shared: dict = {}
        self.per_rank: dict = {}
        self.last_saved: int | None = None

    def register(self, name: str, component, per_rank: bool = False) -> None:
        (self.per_rank if per_rank else self.shared)[name] = component

    def due(self, step: int) -> bool:
        return bool(self.save_dir and self.interval and step % self.interval == 0)

    # --- saving --------------------------------------------------------------------------------------------------

    def save(self, step: int) -> Path:
        name = f"step-{step:07d}"
        final, tmp = self.save_dir / name, self.save_dir / (f".tmp-{name}-{self.job}" if self.job else f".tmp-{name}")
        rank = dist.get_rank()
        latest = self.save_dir / LATEST
        previous = _pointer(latest)[0]
        what = f"saving checkpoint {final}"
        note = f"; {latest} still names {previous}, which is intact" if previous else ""

        def remove_tmp():
            shutil.rmtree(tmp, ignore_errors=True)

        def fresh_dir():
            if rank == 0:
                remove_tmp()
                tmp.mkdir(parents=True)

        raise_agreed(attempt(fresh_dir)[1], what, tmp, remove_tmp, note)
        raise_agreed(attempt(self._write, tmp, rank)[1], what, tmp, remove_tmp, note)
        share = _shares(self._listing(tmp), dist.get_world_size())[rank]
        digests, error = attempt(file_digests, [tmp / rel for rel in share])
        raise_agreed(error, what, tmp, remove_tmp, note)
        gathered = gather({os.path.relpath(path, tmp): d for path, d in digests.items()})

        def publish():
            if rank != 0:
                return
            entries = {rel: {"size": size, "sha256": sha} for part in gathered for rel, (size, sha) in part.items()}
            manifest = {"format": 1, "step": step, "layout": self.layout, "origin": self.origin}
            manifest["files"] = dict(sorted(entries.items()))
            atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
            publish_dir(tmp, final, overwrite=True)  # the same step may be saved again
            atomic_write_text(latest, name)
            old = sorted((p for p in self.save_dir.glob("step-*") if p.is_dir() and _step_of(p) >= 0), key=_step_of)
            for p in old[: -self.keep_last] if self.keep_last > 0 else []:
                shutil.rmtree(p, ignore_errors=True)

        raise_agreed(attempt(publish)[1], what, tmp, remove_tmp, note)
        self.last_saved = step
        return final

    def _write(self, tmp: Path, rank: int) -> None:
        tied = bool(getattr(_config_of(self.model), "tie_word_embeddings", False))
        # tied weights share memory, which safetensors refuses: torch shards then
        self.booster.save_model(self.model, str(tmp / "model"), shard=True, use_safetensors=not tied)
        self.booster.save_optimizer(self.optimizer, str(tmp / "optimizer"), shard=True)
        save_keeping_os_reason(
            {k: c.state_dict() for k, c in self.per_rank.items()}, tmp / RANK_STATE.format(rank=rank)
        )
        if rank == 0:
            save_keeping_os_reason({k: c.state_dict() for k, c in self.shared.items()}, tmp / TRAINER_STATE)

    @staticmethod
    def _listing(root: Path) -> dict[str, int]:
        """{relative path: size} of every file under root as rank 0 sees it (one listing for all ranks)."""
        listing = [None]
        if dist.get_rank() == 0:
            listing[0] = {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
        dist.broadcast_object_list(listing, src=0)
        return listing[0]

    # --- resuming ------------------------------------------------------------------------------------------------

    def resume(self, path: str | os.PathLike) -> Path:
        """Restore the model, the optimizer and every registered component from a checkpoint, or from the newest
        verified checkpoint of a save_dir. Every check runs before the first collective load."""
        chosen, (shared, mine), note = self._choose(Path(path))
        if note:
            log.info(note)
        try:
            self.booster.load_model(self.model, str(chosen / "model"))
            self.booster.load_optimizer(self.optimizer, str(chosen / "optimizer"))
            for states, components in ((shared, self.shared), (mine, self.per_rank)):
                for name, component in components.items():
                    component.load_state_dict(states[name])
        except pickle.UnpicklingError as e:  # a file that matches its manifest but holds pickled objects
            raise CheckpointError(str(e)) from None
        except (KeyError, ValueError, RuntimeError) as e:  # written by a run of another kind, without an origin
            if isinstance(e, RuntimeError) and "size mismatch" not in str(e):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CheckpointError(
                f"--load_checkpoint {path}: {chosen} does not fit this run's model, optimizer or stage "
                f"({type(e).__name__}: {first[:200]}): resume with the model and settings it was written with"
            ) from None
        self.last_saved = None
        return chosen

    def _choose(self, path: Path):
        """(checkpoint, its states, a line saying what was skipped or None). An explicit checkpoint directory must
        pass; a save_dir falls back to its newest checkpoint that passes."""
        explicit, candidates, named, bad_pointer = _scan(path)
        if explicit:
            problem, states = self._check(path)
            if problem is not None:
                raise CheckpointError(problem[0])
            return path, states, None
        pointer = path / LATEST
        if not candidates and named is None:
            raise CheckpointError(
                f"--load_checkpoint {path}: neither a checkpoint ({MANIFEST}), a save_dir with a "
                f"'{LATEST}' pointer or step-N checkpoints, nor a Hugging Face model directory "
                "(config.json)" + (f"; {bad_pointer}" if bad_pointer else "")
            )
        skipped = [] if named is None or named in candidates else [f"{pointer} names {named}, which is missing"]
        if bad_pointer:
            skipped.append(bad_pointer)
        for name in candidates:
            problem, states = self._check(path / name)
            if problem is None:
                if not skipped and name == named:
                    return path / name, states, None
                if named is None and not bad_pointer:
                    skipped.insert(0, f"{path} has no '{LATEST}' pointer")
                note = (
                    f"--load_checkpoint {path}: {'; '.join(skipped) or f'{pointer} names {named}'}; resuming "
                    f"from {name}, the newest complete, verified checkpoint"
                )
                return path / name, states, note
            message, fatal = problem
            if fatal:
                raise CheckpointError(message)
            skipped.append(message)
        raise CheckpointError(f"--load_checkpoint {path}: no complete, verified checkpoint: {'; '.join(skipped)}")

    def _check(self, path: Path):
        """((message, fatal) or None, (shared states, this rank's states)), agreed by every rank: the manifest and
        the layout, every file against the manifest (each rank hashes a share), then the state files."""
        rank, world = dist.get_rank(), dist.get_world_size()
        problem, states = None, (None, None)
        manifest_path = path / MANIFEST
        try:
            manifest = json.loads(manifest_path.read_text())
            files, saved_layout = manifest["files"], manifest["layout"]
        except FileNotFoundError:
            problem = (
                f"{manifest_path} is missing: {path} is not a complete checkpoint (or was written before "
                "checkpoints carried a manifest)",
                False,
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            problem = (f"{manifest_path} is not a readable manifest ({e})", False)
        if problem is None and saved_layout != self.layout:
            keys = [k for k in {**saved_layout, **self.layout} if saved_layout.get(k) != self.layout.get(k)]
            problem = (
                f"{path} was written by a run with {_describe(saved_layout, keys)}; this run has "
                f"{_describe(self.layout, keys)}: resume with the same layout",
                True,
            )
        if problem is None:
            problem = _unsafe_entry(path, files)
        if problem is None:
            different = mismatch(manifest.get("origin"), self.origin, path) if self.origin else None
            problem = (different, True) if different else None
        if problem is None:
            share = _shares({rel: meta["size"] for rel, meta in files.items()}, world)[rank]
            problem = _verify(path, files, share)
        problem = _first(problem)
        if problem is None:
            self.resumed_origin = manifest.get("origin")
        if problem is None:  # every file verified: now the state files, read before any collective load
            try:
                states = (_load_state(path / TRAINER_STATE), _load_state(path / RANK_STATE.format(rank=rank)))
            except CheckpointError as e:
                problem = (str(e), False)
            problem = _first(problem)
        return problem, states


def _first(problem):
    """The problem every rank reports for a check: a fatal one before the others, then the lowest rank's."""
    agreed = [p for p in gather(problem) if p is not None]
    return ([p for p in agreed if p[1]] or agreed or [None])[0]


def _scan(path: Path) -> tuple[bool, list[str], str | None, str | None]:
    """(is `path` itself a checkpoint, its step-N checkpoints newest first, the step `latest` names, why `latest` is
    ignored), as rank 0 sees them: every rank then checks the same candidates in the same order."""
    found = [None]
    if dist.get_rank() == 0:
        explicit = any((path / n).exists() for n in (MANIFEST, TRAINER_STATE)) or bool(STEP_DIR.fullmatch(path.name))
        steps = sorted(
            (p for p in path.glob("step-*") if p.is_dir() and not p.is_symlink() and _step_of(p) >= 0),
            key=_step_of,
            reverse=True,
        )
        found[0] = (explicit, [p.name for p in steps], *_pointer(path / LATEST))
    dist.broadcast_object_list(found, src=0)
    return found[0]


def _pointer(pointer: Path) -> tuple[str | None, str | None]:
    """(the step-N a `latest` pointer names, or None; why it is ignored, or None). A pointer is a small file that
    names a step-N directory beside it: a symlink or anything else is refused like a corrupted file, and never
    shown."""
    if pointer.is_symlink():
        return None, f"{pointer} is a symlink, not a pointer written by a run: ignored"
    if not pointer.is_file():
        return None, None
    try:
        with open(pointer, "rb") as f:
            text = f.read(64).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        text = ""
    if not STEP_DIR.fullmatch(text):
        return None, f"{pointer} does not name a step-N checkpoint: ignored"
    return text, None


def _unsafe_entry(root: Path, files) -> tuple[str, bool] | None:
    """A manifest entry that is not a plain relative path inside the checkpoint, or without a size and sha256, and
    an index file of the Booster that names a file the manifest does not list: refused like a corrupted manifest."""
    manifest = root / MANIFEST
    if not isinstance(files, dict):
        return f"{manifest} is not a readable manifest (no file list)", False
    for rel, meta in files.items():
        why = outside(root, rel)
        if why is None and not (isinstance(meta, dict) and isinstance(meta.get("size"), int) and "sha256" in meta):
            why = "has no size and sha256"
        if why:
            return f"{manifest}: the entry {rel!r} {why}: refused like a corrupted manifest", False
    for rel in (r for r in files if r.endswith(".index.json")):
        try:
            index = json.loads((root / rel).read_text())
            named = list(index.get("weight_map", {}).values()) + [index.get("metadata", {}).get("param_groups")]
        except (OSError, ValueError, AttributeError) as e:
            return f"{root / rel} is not a readable index ({e})", False
        parent = os.path.dirname(rel)
        stray = [n for n in named if n is not None and os.path.join(parent, str(n)) not in files]
        if stray:
            return f"{root / rel} names {stray[0]!r}, which {manifest} does not list: refused", False
    return None


def _verify(root: Path, files: dict, share: list[str]):
    """This rank's share of the manifest's files: present, of the recorded size, with the recorded sha256."""
    present = []
    for rel in share:
        path, size = root / rel, files[rel]["size"]
        if not path.is_file():
            return f"{path} is missing (listed in {root / MANIFEST})", False
        if path.stat().st_size != size:
            return (
                f"{path} has {path.stat().st_size} bytes, {root / MANIFEST} says {size}: truncated or overwritten",
                False,
            )
        present.append(path)
    try:
        digests = file_digests(present)
    except OSError as e:
        return f"{e.filename or root}: cannot be read ({e.strerror})", False
    for path in present:
        if digests[str(path)][1] != files[os.path.relpath(path, root)]["sha256"]:
            return f"{path} does not match its sha256 in {root / MANIFEST}: the file is corrupted", False
    return None


def _config_of(model):
    inner = model.unwrap() if hasattr(model, "unwrap") else model
    return getattr(inner, "config", None)
