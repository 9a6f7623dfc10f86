"""Run a function on N CPU processes joined in one gloo group; collect what each rank returns.

Process start-up (torch import) costs seconds on these machines, so a test module spawns one
group and runs many cases inside it, returning plain picklable results for the test functions to
assert on. The function must live in an importable module (not a test file's local scope): the
children are fresh interpreters that import it by name.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(
    rank: int, fn: Callable[..., Any], world_size: int, port: int, out_dir: str, timeout_s: float, args: tuple
) -> None:
    torch.set_num_threads(1)  # N ranks share 2 cores; more threads only thrash
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        result = fn(rank, world_size, *args)
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0) -> list[Any]:
    """fn(rank, world_size, *args) on world_size processes in a gloo group; results in rank order.

    A rank that raises makes this raise (with the child's traceback). timeout_s bounds every
    collective, so a deadlock fails the test instead of hanging it.
    """
    with tempfile.TemporaryDirectory(prefix="vptrain-spawn-") as out_dir:
        mp.spawn(_entry, args=(fn, world_size, free_port(), out_dir, timeout_s, args), nprocs=world_size)
        results = []
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"rank{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results
