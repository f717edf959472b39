"""torch.distributed support for runs launched by ``torchrun``: rank detection, data sharding,
exact reductions, "rank 0 speaks" helpers, and failing together (``failing_together``: a failure
on one rank ends every rank at its next collective, instead of leaving them waiting there).

Single-process runs need none of it: every helper degrades to the identity when no process group
is initialised, so library code calls them unconditionally.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group that torchrun described in the environment (gloo on CPU, nccl on CUDA).

    Returns True if this process is part of a multi-process run.
    """
    if not launched_by_torchrun():
        return False
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend)
    return True


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def shard_indices(length: int, rank_: int | None = None, world: int | None = None) -> range:
    """Contiguous shard of ``range(length)`` for this rank: every index exactly once over all ranks,
    the first ``length % world`` ranks one longer (no padding, unlike DistributedSampler)."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    base, extra = divmod(length, world)
    start = rank_ * base + min(rank_, extra)
    return range(start, start + base + (1 if rank_ < extra else 0))


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` in rank order (a one-element list in a single process)."""
    if not active():
        return [obj]
    checkpoint()
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def shutdown() -> None:
    """Leave the process group (torch warns at exit about groups left open)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    checkpoint()  # an all-reduce: a barrier that also stops every rank if one failed


class RanksFailed(RuntimeError):
    """Raised on every rank when any rank failed; ``failures`` maps each failed rank to its report."""

    def __init__(self, failures: dict[int, str]):
        super().__init__("; ".join(f"rank {r} failed: {text}" for r, text in failures.items()))
        self.failures = failures


def _agree(report: str | None) -> dict[int, str]:
    """Every rank's failure report (this one's is ``report``; None: no failure), as
    ``{rank: report}`` of the failed ranks: one all-reduce of a flag per rank, and a gather of the
    reports only when a flag is set."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flags = torch.zeros(world_size(), dtype=torch.int32, device=device)
    flags[rank()] = report is not None
    dist.all_reduce(flags)
    if not flags.any():
        return {}
    reports = [None] * world_size()
    dist.all_gather_object(reports, report)
    return {r: text for r, text in enumerate(reports) if text is not None}


def checkpoint() -> None:
    """Where ranks synchronize, agree that none failed, or raise RanksFailed. Every collective here
    starts with one, so the checkpoint of a failing rank (in ``failing_together``) meets the other
    ranks at their next collective, whichever it is: one all-reduce per collective, none per batch."""
    if active():
        failures = _agree(None)
        if failures:
            raise RanksFailed(failures)


def _one_line(error: BaseException) -> str:
    return f"rank {rank()}: {type(error).__name__}: {' '.join(str(error).split())}"


@contextmanager
def failing_together(describe=_one_line):
    """Wrap a rank's whole work under torchrun: an exception inside is reported (``describe(error)``)
    at the other ranks' next checkpoint, and every rank raises RanksFailed (the failing ones from
    their own error). Leaving normally passes a last checkpoint, which meets a rank that failed after
    the last collective. Without a process group, exceptions pass through unchanged."""
    try:
        yield
    except Exception as error:
        if not active() or isinstance(error, RanksFailed):
            raise
        raise RanksFailed(_agree(describe(error))) from error
    checkpoint()
