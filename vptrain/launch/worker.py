"""A worker process: one rank of a run whose resolved config is already in its run directory.

    python -m vptrain.launch.worker RUN_DIR      (ranks from RANK/WORLD_SIZE/... or SLURM_*)

The job is `train` (RUN_DIR/config.yaml) unless VPTRAIN_TASK=eval (`vptrain eval`, whose config is
RUN_DIR/eval_config.yaml, so evaluating in a training run's directory leaves its config alone).
Under torchrun/srun rank 0 hands the task to the others through the store, beside its config.
"""

from __future__ import annotations

import os
import sys
import traceback
from datetime import timedelta

from vptrain import run_lock
from vptrain.config import RunConfig, from_yaml, load
from vptrain.launch.env import LaunchEnv, external_launch
from vptrain.launch.liveness import Heartbeat, hold_lifeline, unresponsive

CONFIG_KEY = "vptrain/config"
TASK_KEY = "vptrain/task"
TASK_ENV = "VPTRAIN_TASK"
CONFIG_FILES = {"train": "config.yaml", "eval": "eval_config.yaml"}
"""The worker's jobs and the file in the run directory that holds each one's resolved config."""


def task_from_env(environ: dict[str, str] | None = None) -> str:
    task = (os.environ if environ is None else environ).get(TASK_ENV, "train")
    if task not in CONFIG_FILES:
        raise ValueError(f"{TASK_ENV}={task!r}: use one of {', '.join(CONFIG_FILES)}")
    return task


def make_store(launch: LaunchEnv, timeout_s: float):
    """The rendezvous store; rank 0 hosts it. It also carries rank 0's config to followers."""
    from torch.distributed import TCPStore

    return TCPStore(
        launch.master_addr,
        launch.master_port,
        world_size=launch.world_size,
        is_master=launch.rank == 0,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


def run_worker(cfg: RunConfig, launch: LaunchEnv, store=None, task: str = "train") -> int:
    from vptrain.evaluate import eval_worker
    from vptrain.train import TrainingError, train_worker

    job = eval_worker if task == "eval" else train_worker
    multi = launch.world_size > 1
    heartbeat = Heartbeat.start(cfg.run_dir, launch.rank, cfg.train.collective_timeout_s) if multi else None
    try:
        job(cfg, launch, store)
        _leave(store, launch)
        return 0
    except TrainingError as err:
        print(f"vptrain: rank {launch.rank}: {err}", file=sys.stderr, flush=True)
        return 3
    except Exception as err:  # noqa: BLE001 - report any failure with the rank, then exit non-zero
        traceback.print_exc()
        print(f"vptrain: rank {launch.rank} failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        if multi:
            _name_unresponsive_peers(cfg, launch)
        return 1
    finally:
        if heartbeat is not None:
            heartbeat.stop()


def _name_unresponsive_peers(cfg: RunConfig, launch: LaunchEnv) -> None:
    """After a failure (typically a collective timeout): the peers whose heartbeat went stale are
    the likely cause, this rank only waited for them. Under srun/torchrun nobody else names them."""
    peers = {r: None for r in range(launch.world_size) if r != launch.rank}
    for rank, why in unresponsive(cfg.run_dir, peers, cfg.train.collective_timeout_s):
        print(f"vptrain: rank {launch.rank}: rank {rank} stopped responding ({why}): the likely cause",
              file=sys.stderr, flush=True)


def _leave(store, launch: LaunchEnv, timeout_s: float = 30.0) -> None:
    """Rank 0 hosts the rendezvous store: it stays until every rank has finished with it, so no
    rank's store client loses its server while the process is shutting down."""
    if store is None:
        return
    import time

    store.add("vptrain/exited", 1)
    if launch.rank != 0:
        return
    deadline = time.monotonic() + timeout_s
    while store.add("vptrain/exited", 0) < launch.world_size and time.monotonic() < deadline:
        time.sleep(0.01)


def run_follower(launch: LaunchEnv, timeout_s: float = 600.0) -> int:
    """Ranks > 0 under torchrun/srun: wait for rank 0's task and resolved config, then run it."""
    store = make_store(launch, timeout_s)
    task = store.get(TASK_KEY).decode()  # rank 0 sets it before the config
    cfg = from_yaml(store.get(CONFIG_KEY).decode())
    return run_worker(cfg, launch, store, task)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m vptrain.launch.worker RUN_DIR", file=sys.stderr)
        return 2
    run_dir = argv[0]
    launch = external_launch() or LaunchEnv(0, 1, 0, "127.0.0.1", 0)
    under_local_launcher = hold_lifeline(run_dir, launch.rank)  # first: die with the launcher
    task = task_from_env()
    cfg = load(os.path.join(run_dir, CONFIG_FILES[task]))
    lock = None
    if not under_local_launcher and launch.rank == 0:
        # srun/torchrun started the ranks (the batch script of `vptrain submit`): the job's rank 0
        # holds the run directory; the local launcher holds it itself for its workers.
        try:
            lock = run_lock.acquire(run_dir)
        except run_lock.RunDirInUse as err:
            print(f"vptrain: rank 0: {err}", file=sys.stderr, flush=True)
            return 2
    try:
        store = make_store(launch, cfg.train.collective_timeout_s) if launch.world_size > 1 else None
        return run_worker(cfg, launch, store, task)
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    sys.exit(main())
