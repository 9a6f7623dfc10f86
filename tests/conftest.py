"""Shared test helpers: run the real `vptrain` CLI in a subprocess and read what a run wrote."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/wandb_reader.py


# The distributed tests run gloo ranks on CPUs. Saying so spares each launcher importing torch only
# to ask whether a GPU is there (cluster.device=auto: ~3 s of CPU per launch on these machines,
# before any rank starts); `make run` and the tests of the device choice keep the default.
ON_CPU = "cluster.device=cpu"


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"DS_ACCELERATOR": "cpu", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"})
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                "SLURM_STEP_ID", "WANDB_API_KEY"):
        env.pop(key, None)
    env.update(extra)
    return env


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 300,
            check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "vptrain.cli", *args],
        cwd=cwd or REPO, env=env or cli_env(), capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"vptrain {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def train_run(run_dir: Path, *overrides: str, env: dict[str, str] | None = None, timeout: float = 300) -> dict:
    """Train with the given overrides into run_dir; return summary.json."""
    run_cli("train", f"hydra.run.dir={run_dir}", *overrides, env=env, timeout=timeout, check=True)
    return json.loads((run_dir / "summary.json").read_text())


def load_params(run_dir: Path) -> dict:
    import torch

    params: dict = {}
    for f in sorted((run_dir / "params").glob("*.pt")):
        params.update(torch.load(f))
    return params


def validated_config(**overrides):
    """A RunConfig from dotted overrides (`**{"layout.pp": 2}`), validated as the CLI would."""
    from omegaconf import OmegaConf

    from vptrain.config import RunConfig
    from vptrain.validate import validate

    dotlist = [f"{k}={v}" for k, v in overrides.items()]
    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.from_dotlist(dotlist), {"run_dir": "x"})
    cfg = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


@pytest.fixture
def repo() -> Path:
    return REPO


class ConsoleCapture:
    """vptrain's console lines (vptrain/console.py) go to stdout, or to logging once logging is
    configured for them (an in-process Hydra run earlier in the same test process does that):
    read both."""

    def __init__(self, capsys, caplog):
        self.capsys, self.caplog = capsys, caplog

    def read(self) -> str:
        out = self.capsys.readouterr().out
        logged = "".join(r.getMessage() + "\n" for r in self.caplog.records if r.name.startswith("vptrain"))
        self.caplog.clear()
        return out + logged


@pytest.fixture
def console(capsys, caplog) -> ConsoleCapture:
    return ConsoleCapture(capsys, caplog)


@dataclass(frozen=True)
class SlurmCluster:
    nodes: int


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    """A Slurm cluster to submit to. As root the session starts the one-machine dev cluster itself
    (slurm/dev-cluster/up.sh, two fake nodes; it installs the packages when missing), so `make test`
    works on a fresh machine; otherwise it uses whatever cluster answers, or skips with the reason."""
    is_root = os.geteuid() == 0
    if shutil.which("sbatch") is None and not is_root:
        pytest.skip("Slurm tests need `sbatch`, or root to install and start the dev cluster "
                    "(sudo slurm/dev-cluster/up.sh)")
    if is_root:
        env = dict(os.environ, SLURM_FAKE_NODES="2")
        up = subprocess.run(["bash", str(REPO / "slurm" / "dev-cluster" / "up.sh")], env=env, capture_output=True,
                            text=True, timeout=600)
        if up.returncode != 0:
            pytest.fail(f"slurm/dev-cluster/up.sh failed ({up.returncode}):\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}")
    try:
        sinfo = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"sinfo failed ({err}); start the dev cluster with slurm/dev-cluster/up.sh")
    nodes = len(set(sinfo.stdout.split())) if sinfo.returncode == 0 else 0
    if not nodes:
        pytest.skip("sbatch is installed but no Slurm controller answers; start slurm/dev-cluster/up.sh as root")
    return SlurmCluster(nodes=nodes)
