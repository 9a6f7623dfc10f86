"""Run the engine case matrices of a test session in ONE group of spawned CPU processes.

test_vocab_engine.py, test_baseline.py, test_vocab_memory.py, test_strict_order.py,
test_plan_is_what_runs.py and test_split_backward.py each declare a `MATRIX`: cases of one kind
that _engine_matrix.py trains on `world` gloo ranks. Starting torch + deepspeed costs seconds per
process, so the first of those modules to ask for its results (run_matrix, from a module-scoped
fixture) runs the cases of every module collected in the session whose matrix has the same world
size, in one group, one case after the other; each module then reads its own results, by case
name. Run alone, a module runs only its own cases.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, cli_env

from vptrain.launch.local import free_port


@dataclass(eq=False)  # compared (and hashed) by identity: one per test module
class Matrix:
    kind: str  # what _engine_matrix.py does with each case: "equivalence", "memory", "strict", "resume", ...
    cases: list[dict]  # each with a unique "name" and the "overrides" of its configuration
    timeout_s: float  # for all its cases; a group running several matrices waits the sum
    world: int = 4


@dataclass
class Runs:
    """What the group wrote for one matrix: runs[name] is the folder of the case of that name."""

    dirs: dict[str, Path]
    logs: list[str]  # every rank's output, of the whole group
    returncodes: list[int]  # 0: the rank ran every case (a case's errors are in its folder)

    def __getitem__(self, name: str) -> Path:
        return self.dirs[name]

    def clean(self, name: str) -> Path:
        """The folder of case `name`, which no rank recorded an error in."""
        case_dir = self.dirs[name]
        errors = sorted(case_dir.glob("error_rank*.txt"))
        assert not errors, errors[0].read_text()[-4000:] + "\n" + "\n".join(log[-2000:] for log in self.logs)
        return case_dir


_RUNS = pytest.StashKey[dict]()  # Matrix -> Runs, for this session


def run_matrix(request: pytest.FixtureRequest, matrix: Matrix) -> Runs:
    """matrix's results; the first call of a session also runs the matrices of the other modules."""
    done = request.session.stash.setdefault(_RUNS, {})
    if matrix not in done:
        others = [m for m in _collected(request.session)
                  if m is not matrix and m not in done and m.world == matrix.world]
        out = request.getfixturevalue("tmp_path_factory").mktemp("engine-matrix")
        done.update(_run_group([matrix, *others], out))
    return done[matrix]


def _collected(session: pytest.Session) -> list[Matrix]:
    """The matrices of the modules with tests in this session, in their order."""
    found: list[Matrix] = []
    for item in session.items:
        matrix = getattr(getattr(item, "module", None), "MATRIX", None)
        if isinstance(matrix, Matrix) and matrix not in found:
            found.append(matrix)
    return found


def _run_group(matrices: list[Matrix], out: Path) -> dict[Matrix, Runs]:
    cases = [{**case, "kind": m.kind} for m in matrices for case in m.cases]
    (out / "cases.json").write_text(json.dumps(cases))
    world = matrices[0].world
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = cli_env(RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                      OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "distributed" / "_engine_matrix.py"), str(out / "cases.json"),
             str(out), str(world)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        logs = [p.communicate(timeout=sum(m.timeout_s for m in matrices))[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:  # a timeout: stop the group rather than leave it training
                p.kill()
    returncodes = [p.returncode for p in procs]
    runs, first = {}, 0
    for m in matrices:
        dirs = {case["name"]: out / f"case{first + i}" for i, case in enumerate(m.cases)}
        assert len(dirs) == len(m.cases), f"two {m.kind} cases share a name"
        runs[m] = Runs(dirs, logs, returncodes)
        first += len(m.cases)
    return runs
