"""`vptrain train` and `vptrain eval`: run in the process where Hydra composed the config."""

from __future__ import annotations

import os
import sys

from vptrain import run_lock
from vptrain.config import RunConfig, to_yaml
from vptrain.launch.env import external_launch
from vptrain.launch.local import run_local, stopped_on_request
from vptrain.launch.worker import CONFIG_FILES, CONFIG_KEY, TASK_ENV, TASK_KEY, make_store, run_worker
from vptrain.validate import validate_for_this_machine


def write_run_dir(cfg: RunConfig, task: str = "train") -> str:
    """The resolved config every rank uses; written atomically before any rank starts."""
    os.makedirs(cfg.run_dir, exist_ok=True)
    path = os.path.join(cfg.run_dir, CONFIG_FILES[task])
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(to_yaml(cfg))
    os.replace(tmp, path)
    return path


def train(cfg: RunConfig, flags: list[str] | None = None) -> int:
    validate_for_this_machine(cfg)
    # One job per run directory, locked before anything of this job is written into it (the CLI
    # locked it already, before Hydra wrote .hydra/; this shares that lock). Refused: exit 2.
    with run_lock.acquire(cfg.run_dir) as lock:
        write_run_dir(cfg)
        return _launch(cfg, lock)


def evaluate(cfg: RunConfig, flags: list[str] | None = None) -> int:
    """`vptrain eval`: the mean token loss of the run's weights on data.eval_path (vptrain/evaluate.py),
    in cfg's layout, written to run_dir/eval.json."""
    from vptrain.preflight import preflight

    if not cfg.data.eval_path:
        raise ValueError("data.eval_path: vptrain eval needs a token file to evaluate on (data.eval_path=FILE.bin)")
    validate_for_this_machine(cfg)
    preflight(cfg, external_launch())  # the checkpoint to load, the data, this machine
    with run_lock.acquire(cfg.run_dir) as lock:  # not with a training job of the same directory
        write_run_dir(cfg, task="eval")
        return _launch(cfg, lock, task="eval")


def _launch(cfg: RunConfig, lock: run_lock.RunLock, task: str = "train") -> int:
    launch = external_launch()
    if launch is not None:
        # torchrun/srun started the ranks; this is rank 0 (cli.main routes the others elsewhere).
        store = make_store(launch, cfg.train.collective_timeout_s)
        store.set(TASK_KEY, task)
        store.set(CONFIG_KEY, to_yaml(cfg))
        return run_worker(cfg, launch, store, task)
    world = cfg.layout.pp * cfg.layout.dp
    if world == 1:
        from vptrain.launch.env import LaunchEnv

        return run_worker(cfg, LaunchEnv(0, 1, 0, "127.0.0.1", 0), task=task)
    env = {"DS_ACCELERATOR": "cpu"} if cfg.cluster.device == "cpu" else {}
    env[TASK_ENV] = task
    code = run_local(
        cfg.run_dir,
        world_size=world,
        pp=cfg.layout.pp,
        master_addr=cfg.launcher.master_addr,
        master_port=cfg.launcher.master_port,
        threads=cfg.launcher.threads_per_rank,
        extra_env=env,
        collective_timeout_s=cfg.train.collective_timeout_s,
        inherit_fds=(lock.fd,) if lock.fd is not None else (),  # locked until the last rank is gone
    )
    what = "training" if task == "train" else "eval"
    if code == 0:
        done = "done" if task == "train" else f"eval done, {os.path.join(cfg.run_dir, 'eval.json')}"
        print(f"vptrain: {done}; run directory {cfg.run_dir}", flush=True)
    elif not stopped_on_request(code):  # the launcher said why it stopped
        print(f"vptrain: {what} failed (exit {code}); logs in {os.path.join(cfg.run_dir, 'logs')}",
              file=sys.stderr, flush=True)
    return code
