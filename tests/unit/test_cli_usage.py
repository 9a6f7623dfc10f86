"""`vptrain` with no command, help or --version: what it prints and how it exits."""

from __future__ import annotations

import re

import pytest
from conftest import REPO

import vptrain.cli as cli


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def test_version_is_the_package_version(capsys) -> None:
    declared = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    for flag in ("--version", "-V"):
        assert _run([flag], capsys) == (0, f"vptrain {declared}\n", "")


def test_help_lists_every_command_and_no_command_is_an_error(capsys) -> None:
    code, out, _ = _run(["--help"], capsys)
    assert code == 0
    for command in ("train", "plan", "submit", "eval", "export-hf", "compare", "prepare-data", "--version"):
        assert f"vptrain {command}" in out, command
    assert _run([], capsys)[0] == cli.EXIT_CONFIG_ERROR


def test_an_unknown_command_names_itself_and_exits_2(capsys) -> None:
    code, _, err = _run(["trian"], capsys)
    assert code == cli.EXIT_CONFIG_ERROR and "unknown command 'trian'" in err


@pytest.mark.parametrize("command", ["train", "plan", "submit", "eval"])
def test_command_help_lists_groups_keys_docs_and_flags(command, capsys, tmp_path, monkeypatch) -> None:
    from vptrain.cli_help import config_keys
    from vptrain.config import RunConfig

    monkeypatch.chdir(tmp_path)
    code, out, _ = _run([command, "--help"], capsys)
    assert code == 0
    assert list(tmp_path.iterdir()) == []  # help composes nothing and writes no run directory
    for group in (REPO / "conf").iterdir():
        if group.is_dir():
            options = sorted(p.stem for p in group.glob("*.yaml"))
            assert f"  {group.name:<11} {', '.join(options)}\n" in out, group.name
    keys = [key for key, _, _ in config_keys(RunConfig)]
    assert "layout.pp" in keys and "schedule.virtual_stages" in keys and "search.gpus" in keys
    for key in keys:
        assert f"  {key}=" in out, key
    assert re.search(r"^  layout\.pp=2 +Pipeline stages\.$", out, re.M)  # the docstring config.py gives it
    assert ("--dry-run" in out) == (command == "submit") and ("--search" in out) == (command == "plan")
