"""failing_together under a real 2-process gloo group: a failure on one rank reaches every rank at
its next collective (this module imports little: spawned workers re-import it)."""
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hmtconv import distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _checkpoint_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Three runs under failing_together: rank 1 fails before a gather of rank 0's, rank 0 fails
    after the last collective, nobody fails; records what each rank saw."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)

    def fail_on(bad: int, before_gather: bool) -> None:
        if before_gather and rank == bad:
            raise ValueError(f"broken shard {bad}")
        distributed.all_gather_objects(rank)
        if not before_gather and rank == bad:
            raise ValueError(f"broken shard {bad}")

    seen = []
    try:
        for bad, before in ((1, True), (0, False), (None, True)):
            try:
                with distributed.failing_together():
                    fail_on(bad, before)
                seen.append(None)
            except distributed.RanksFailed as failed:
                seen.append((failed.failures, type(failed.__cause__).__name__))
        torch.save(seen, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_failing_together_stops_every_rank_at_its_next_collective(tmp_path):
    mp.spawn(_checkpoint_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    seen = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    first = {1: "rank 1: ValueError: broken shard 1"}
    second = {0: "rank 0: ValueError: broken shard 0"}
    assert seen[0] == [(first, "NoneType"), (second, "ValueError"), None]
    assert seen[1] == [(first, "ValueError"), (second, "NoneType"), None]
