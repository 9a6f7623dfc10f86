"""The `vptrain` command.

    vptrain train  [overrides...] [-m]     compose, validate, start pp*dp workers, train
    vptrain plan   [overrides...] [-m]     layout, memory, schedule and predicted time; starts nothing
    vptrain submit [overrides...] [-m] [--dry-run]   render and submit an sbatch job per config
    vptrain compare DIR                     table + plots over the runs under DIR
    vptrain prepare-data ...                BPE tokenizer + memmap token shards from text files

Hydra composes the config once, here; config mistakes print one line and exit 2 before anything
starts.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

EXIT_CONFIG_ERROR = 2
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

HYDRA_COMMANDS = ("train", "plan", "submit")
USAGE = __doc__


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if argv else EXIT_CONFIG_ERROR)
    command, rest = argv[0], argv[1:]
    if command in HYDRA_COMMANDS:
        if command == "train":
            from vptrain.launch.env import external_launch

            launch = external_launch()
            if launch is not None and launch.rank != 0:
                # Ranks started by torchrun/srun: only rank 0 composes; the rest receive its config.
                from vptrain.launch.worker import run_follower

                sys.exit(run_follower(launch))
        sys.exit(_run_hydra(command, rest))
    if command == "compare":
        from vptrain.compare import main as compare_main

        sys.exit(compare_main(rest))
    if command == "prepare-data":
        from vptrain.prepare_data import main as prepare_main

        sys.exit(prepare_main(rest))
    print(f"vptrain: unknown command '{command}'\n{USAGE}", file=sys.stderr)
    sys.exit(EXIT_CONFIG_ERROR)


def _handler(command: str) -> Callable:
    if command == "train":
        from vptrain.launch.entry import train

        return train
    if command == "plan":
        from vptrain.plan import run_plan

        return run_plan
    from vptrain.launch.submit import submit

    return submit


def _run_hydra(command: str, rest: list[str]) -> int:
    import hydra
    from omegaconf import DictConfig

    from vptrain.config import register_configs

    register_configs()
    extra_flags = [a for a in rest if a in ("--dry-run",)]
    rest = [a for a in rest if a not in extra_flags]
    state = {"started": False, "code": 0}

    @hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
    def _task(dcfg: DictConfig) -> int:
        state["started"] = True
        try:
            cfg = materialize(dcfg)
            if command == "train" and os.environ.get("SUBMITIT_EXECUTOR"):
                return _run_submitit_task(cfg)
            code = _handler(command)(cfg, flags=extra_flags) or 0
        except ValueError as err:
            if os.environ.get("SUBMITIT_EXECUTOR"):
                raise  # inside a submitit job: submitit hands the error to the waiting launcher
            print(f"vptrain {command}: config error: {err}", file=sys.stderr)
            sys.exit(EXIT_CONFIG_ERROR)
        state["code"] = max(state["code"], int(code))
        return int(code)

    sys.argv = [f"vptrain {command}"] + rest
    try:
        _task()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        # Hydra exits 1 after printing a composition error (unknown key, bad type): a config error.
        if code == 1 and not state["started"]:
            return EXIT_CONFIG_ERROR
        return code
    return state["code"]


def _run_submitit_task(cfg) -> int:
    """Hydra's submitit launcher (launcher=submitit_slurm) runs the task function in every task of a
    Slurm job: once per rank. Rank 0 trains with the composed config and serves it to the others, as
    under torchrun. A failure raises, so the launching process, which waits for the jobs, reports it."""
    from vptrain.launch.entry import train
    from vptrain.launch.env import export, external_launch
    from vptrain.launch.submit import for_slurm
    from vptrain.launch.worker import run_follower

    launch = external_launch()
    if launch is None:
        raise RuntimeError("launcher=submitit_slurm: this task is not inside an srun step")
    export(launch)  # DeepSpeed reads RANK/LOCAL_RANK/WORLD_SIZE from the environment
    # for_slurm: train.resume=auto, so a requeued job continues from its checkpoint.
    code = train(for_slurm(cfg)) if launch.rank == 0 else run_follower(launch)
    if code:
        raise RuntimeError(f"rank {launch.rank} of Slurm job {os.environ.get('SLURM_JOB_ID')} exited with {code}; "
                           f"logs under {os.path.dirname(cfg.run_dir)}/.submitit")
    return 0


def materialize(dcfg) -> object:
    """DictConfig from Hydra -> typed RunConfig with the run directory, experiment name and
    overrides filled in, validated."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict

    from vptrain.launch.env import external_launch
    from vptrain.validate import validate

    hc = HydraConfig.get()
    with open_dict(dcfg):
        dcfg.run_dir = os.path.abspath(hc.runtime.output_dir)
        choice = hc.runtime.choices.get("experiment")
        dcfg.experiment = choice if choice and choice != "null" else "default"
        dcfg.overrides = list(hc.overrides.task)
        if hc.mode == RunMode.MULTIRUN and not dcfg.logger.get("group"):
            # One W&B group per sweep: the experiment plus the sweep directory's name.
            dcfg.logger.group = f"{dcfg.experiment}-{os.path.basename(os.path.abspath(hc.sweep.dir))}"
    cfg = OmegaConf.to_object(dcfg)
    launch = external_launch()
    validate(cfg, world_size=launch.world_size if launch else None)
    return cfg


if __name__ == "__main__":
    main()
