"""The `vptrain` command.

    vptrain train  [overrides...] [-m]     compose, validate, start pp*dp workers, train
    vptrain plan   [overrides...] [-m]     layout, memory, schedule and predicted time; starts nothing
    vptrain plan --search search.gpus=N search.memory_gib=G [overrides...]   rank methods x layouts
    vptrain submit [overrides...] [-m] [--dry-run]   render and submit an sbatch job per config
    vptrain eval   [overrides...]          mean token loss on data.eval_path -> run_dir/eval.json
    vptrain export-hf RUN_DIR OUT_DIR [--step N]   a run's checkpoint as a Hugging Face model
    vptrain compare DIR                     table + plots over the runs under DIR
    vptrain prepare-data ...                BPE tokenizer + memmap token shards from text files
    vptrain --version                       the installed version
    vptrain COMMAND --help                  train/plan/submit/eval: config groups, keys, flags

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

HYDRA_COMMANDS = ("train", "plan", "submit", "eval")
USAGE = __doc__


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if argv else EXIT_CONFIG_ERROR)
    if argv[0] in ("-V", "--version"):
        from importlib.metadata import version

        print(f"vptrain {version('vptrain')}")
        sys.exit(0)
    command, rest = argv[0], argv[1:]
    if command in HYDRA_COMMANDS:
        if any(a in ("-h", "--help") for a in rest):
            from vptrain.cli_help import command_help

            print(command_help(command, CONF_DIR, USAGE))
            sys.exit(0)
        if command in ("train", "eval"):
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
    if command == "export-hf":
        from vptrain.hf.export import main as export_main

        sys.exit(export_main(rest))
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
    if command == "eval":
        from vptrain.launch.entry import evaluate

        return evaluate
    from vptrain.launch.submit import submit

    return submit


def _run_hydra(command: str, rest: list[str]) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import DictConfig

    from vptrain.config import register_configs
    from vptrain.hydra_checks import callback_overrides, check_overrides, hydra_error_line, hydra_raises

    register_configs()
    extra_flags = [a for a in rest if a in ("--dry-run", "--search")]
    rest = [a for a in rest if a not in extra_flags]
    try:
        check_overrides(rest, config_groups())
    except ValueError as err:
        print(f"vptrain {command}: config error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    state = {"started": False, "code": 0}

    @hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
    def _task(dcfg: DictConfig) -> int:
        state["started"] = True
        try:
            cfg = materialize(dcfg)
            if command == "train" and HydraConfig.get().mode == RunMode.MULTIRUN:
                _preflight_multirun_job(cfg)  # a single run was checked before Hydra wrote anything
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

    # The callback validates between composition and Hydra's creating the run directory.
    # An eval inside a training run's directory keeps that run's .hydra/ (its composed config).
    own_subdir = ["hydra.output_subdir=.hydra-eval"] if command == "eval" else []
    sys.argv = [f"vptrain {command}"] + rest + own_subdir + callback_overrides(command)
    try:
        with hydra_raises():
            _task()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        # Hydra exits 1 after printing a composition error (unknown key, bad type): a config error.
        if code == 1 and not state["started"]:
            return EXIT_CONFIG_ERROR
        return code
    except Exception as err:
        if state["started"]:
            raise
        # Hydra's parse / composition errors: one line naming the override, not Hydra's 6-8.
        print(f"vptrain {command}: config error: {hydra_error_line(err)}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    return state["code"]


def config_groups() -> set[str]:
    return {p.name for p in Path(CONF_DIR).iterdir() if p.is_dir()}


def _preflight_multirun_job(cfg) -> None:
    """In a sweep Hydra writes each job's directory before the task: check each job here, on the
    rank that composed it (rank 0 under srun)."""
    from vptrain.launch.env import external_launch
    from vptrain.preflight import preflight

    launch = external_launch()
    if launch is None or launch.rank == 0:
        preflight(cfg, launch)


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


def materialize(dcfg, hydra_cfg=None, output_dir: str | None = None) -> object:
    """DictConfig from Hydra -> typed RunConfig with the run directory, experiment name and
    overrides filled in, validated. Inside the task Hydra's config comes from HydraConfig; before
    the run directory exists (hydra_checks.CheckBeforeLaunch) the caller passes it and the directory."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    from vptrain.hydra_checks import check_composed_keys
    from vptrain.launch.env import external_launch
    from vptrain.validate import validate

    hc = hydra_cfg if hydra_cfg is not None else HydraConfig.get()
    check_composed_keys(dcfg)
    with open_dict(dcfg):
        dcfg.run_dir = os.path.abspath(output_dir if output_dir is not None else hc.runtime.output_dir)
        choice = hc.runtime.choices.get("experiment")
        dcfg.experiment = choice if choice and choice != "null" else "default"
        # Kept verbatim: an override holding "${...}" must not be resolved a second time here.
        dcfg.overrides = [o.replace("${", "\\${") for o in OmegaConf.to_container(hc.overrides.task, resolve=False)]
        if hc.mode == RunMode.MULTIRUN and not dcfg.logger.get("group"):
            # One W&B group per sweep: the experiment plus the sweep directory's name.
            dcfg.logger.group = f"{dcfg.experiment}-{os.path.basename(os.path.abspath(hc.sweep.dir))}"
    try:
        cfg = OmegaConf.to_object(dcfg)
    except OmegaConfBaseException as err:  # a missing value (data.path: ???), a broken interpolation
        key = getattr(err, "full_key", None) or "config"
        raise ValueError(f"{key}: {str(err).strip().splitlines()[0]}") from None
    from vptrain.data_meta import adopt_data_meta
    from vptrain.hf.shape import adopt_hf_shape

    cfg = adopt_hf_shape(cfg, overrides=cfg.overrides)  # model.init_from=hf:DIR: shape from its config.json
    cfg = adopt_data_meta(cfg)  # data.dtype from prepare-data's meta.json
    launch = external_launch()
    validate(cfg, world_size=launch.world_size if launch else None)
    return cfg


if __name__ == "__main__":
    main()
