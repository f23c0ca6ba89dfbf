"""Helpers for multi-process tests: a free TCP port chosen at run time, a torchrun launcher, and
gloo worker processes for checks that need no model."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int = 2) -> list[str]:
    """``python -m torch.distributed.run`` for ``nproc`` local processes on a free port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
    ]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_gloo(fn: Callable, world: int = 2, *args) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned gloo processes; raises if one fails."""
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(world, free_port(), fn, args), nprocs=world, join=True)
