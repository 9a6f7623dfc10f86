"""Every `vptrain plan` and `vptrain submit --dry-run` command in the README's and docs' code blocks
runs as written (issue 14: a README example once failed: 4 layers cannot fill 8 stages). They start
no rank and need no GPU; the run directory is redirected into the test's temporary folder."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from conftest import REPO, run_cli

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUNS_AS_WRITTEN = ("vptrain plan ", "vptrain submit --dry-run ")


def _commands() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", doc.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                command = line.split("  #", 1)[0].strip()
                if command.startswith(RUNS_AS_WRITTEN) and "..." not in command:
                    found.append((doc.relative_to(REPO).as_posix(), command))
    return found


COMMANDS = _commands()


def test_the_docs_have_such_commands() -> None:
    docs = {doc for doc, _ in COMMANDS}
    assert {"README.md", "docs/cluster.md"} <= docs, docs
    assert any("submit --dry-run" in c for d, c in COMMANDS if d == "README.md")


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[f"{d}:{c[:60]}" for d, c in COMMANDS])
def test_documented_command_runs_as_written(doc: str, command: str, tmp_path: Path) -> None:
    args = shlex.split(command)[1:]
    multirun = "-m" in args
    if not any(a.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for a in args):
        args.append(f"hydra.{'sweep' if multirun else 'run'}.dir={tmp_path / 'out'}")
    proc = run_cli(*args, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, f"{doc}: `{command}` exited {proc.returncode}:\n{proc.stderr[-2000:]}"
