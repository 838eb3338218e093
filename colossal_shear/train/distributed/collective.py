"""Errors that stay collective once the process group is up (docs/reliability.md).

Two mechanisms, for the two kinds of failure:

- A check every rank makes at the same point (its checkpoint files, its data, its layout): each rank calls
  `agree(ok, message)` and, when any rank is not ok, every rank raises the same `CollectiveError` naming the ranks
  and their reasons, before anyone enters a collective that would wait for the failing rank.
- Anything else, raised on some ranks only (a bug, an I/O error, a fault in a stage hook): `fail(error)` closes this
  rank's process group without a barrier and the process exits. Peers blocked on it see closed connections (gloo) and
  the launcher's agent (torchrun; `colossalai run` starts torchrun) stops the rest of the job, so the job ends in
  seconds instead of waiting for the process-group timeout.

Either way each message is printed once: `claim_report` lets the first rank that meets a message print it.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta

import torch
import torch.distributed as dist

from colossal_shear.core.errors import UserError


class CollectiveError(UserError):
    """Raised on every rank together by `agree`; rank 0 prints it."""


def agree(ok: bool, message: str = "", group=None) -> None:
    """Every rank of `group` calls this at the same point; when any rank passes ok=False, every rank raises
    CollectiveError with the failing ranks' messages. Costs one all-gather of small objects: for checks, not steps."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        if not ok:
            raise CollectiveError(message)
        return
    gathered = gather(None if ok else message, group)
    failed = [(rank, msg) for rank, msg in enumerate(gathered) if msg is not None]
    if failed:
        if len({msg for _, msg in failed}) == 1 and len(failed) == len(gathered):
            raise CollectiveError(failed[0][1])
        raise CollectiveError("; ".join(f"[rank {rank}] {msg}" for rank, msg in failed))


def gather(problem, group=None) -> list:
    """Every rank's `problem` (None when it has none, else any picklable description), in rank order, known to every
    rank: the primitive of every agreed check (`agree`, and checkpoint.py's save and resume steps)."""
    if not dist.is_initialized():
        return [problem]
    problems: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(problems, problem, group=group)
    return problems


def all_true(flag: torch.Tensor, group=None) -> bool:
    """Whether `flag` (a 0-dim tensor on the process group's device) is true on every rank: one all-reduce and one
    host read."""
    t = flag.detach().reshape(1).to(torch.float32)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


class PeerFailure(UserError):
    """This rank's collective failed because another rank left: that rank's own error says why."""

    rank_local = True


# how gloo and NCCL report a peer that has gone (crashed, or closed its process group in `fail`)
PEER_GONE = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "remote process exited",
    "NCCL communicator was aborted",
)


def fail(error: BaseException) -> BaseException:
    """This rank is leaving with `error`: decide whether it prints the error, then close the process group at once
    (no barrier: the other ranks may be anywhere) so that nobody waits for this rank. Returns the error to raise:
    a collective broken by a departed peer becomes one line, not a second traceback."""
    gone = [text for text in PEER_GONE if isinstance(error, RuntimeError) and text in str(error)]
    if gone:
        error = PeerFailure(f"stopped: another rank left the job ({gone[0]}); its own error says why")
    if isinstance(error, (UserError, OSError)) and not hasattr(error, "report_here"):  # what cli.report prints
        error.report_here = claim_report(str(error))
    if dist.is_initialized():
        try:
            if dist.get_backend() == "nccl":
                dist.distributed_c10d._abort_process_group()  # NCCL kernels in flight never return otherwise
            else:
                dist.destroy_process_group()  # gloo: closes the sockets peers are blocked on
        except Exception:  # leaving anyway: the launcher stops the other ranks when this process exits
            pass
    return error


def claim_report(message: str) -> bool:
    """True on the first rank that claims `message` (through the launcher's key-value store, which outlives any rank
    under torchrun), so an error met by several ranks is printed once and one met by a single rank is printed by it.
    Without a reachable store every rank claims it."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return True
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=5))
        key = "colossal_shear/error/" + hashlib.sha1(message.encode()).hexdigest()
        return store.add(key, 1) == 1
    except Exception:
        return True
