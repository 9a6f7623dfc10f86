"""`vptrain train|plan|submit|eval --help`: the config groups and their options, every key with its
default and the docstring config.py gives it, and the command's own flags. Hydra's own help (its
`--hydra-help`, `--cfg job`) stays reachable; this one answers "what can I set"."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from functools import cache
from pathlib import Path

FLAGS = {
    "train": [("-m", "Hydra multirun: one run per point of the comma-separated overrides")],
    "plan": [("-m", "one plan per point of the comma-separated overrides"),
             ("--search", "rank methods x schedules x (pp, dp) for search.gpus GPUs (search.* keys)")],
    "submit": [("--dry-run", "render and check the sbatch script, submit nothing"),
               ("-m", "one job per point of the comma-separated overrides")],
    "eval": [],
}
KEY_WIDTH = 40


@cache
def field_docs(cls: type) -> dict[str, str]:
    """A dataclass's field -> the first paragraph of the string literal written under it, on one line."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for stmt, following in zip(body, body[1:], strict=False):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[stmt.target.id] = " ".join(following.value.value.split("\n\n", 1)[0].split())
    return docs


def config_keys(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) of every leaf of a config dataclass, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            out += config_keys(kind, f"{prefix}{f.name}.")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "???"
        out.append((f"{prefix}{f.name}", repr(default) if isinstance(default, str) else str(default),
                    field_docs(cls).get(f.name, "")))
    return out


def group_options(conf_dir: str) -> dict[str, list[str]]:
    return {group.name: sorted(p.stem for p in group.glob("*.yaml"))
            for group in sorted(Path(conf_dir).iterdir()) if group.is_dir()}


def summary(command: str, usage: str) -> str:
    """What `command` does, from its line in the CLI's usage text (vptrain/cli.py's docstring)."""
    line = next(ln for ln in usage.splitlines() if ln.strip().startswith(f"vptrain {command} "))
    return line.split("   ")[-1].strip()


def command_help(command: str, conf_dir: str, usage: str) -> str:
    from vptrain.config import RunConfig

    lines = [f"vptrain {command} [flags] [group=option ...] [key=value ...]", "", summary(command, usage), ""]
    if FLAGS[command]:
        lines.append("flags:")
        lines += [f"  {flag:<10} {what}" for flag, what in FLAGS[command]]
        lines.append("")
    lines.append("config groups (group=option; an experiment sets several at once):")
    lines += [f"  {group:<11} {', '.join(options)}" for group, options in group_options(conf_dir).items()]
    lines += ["", "keys (key=default, then what it does):"]
    for key, default, doc in config_keys(RunConfig):
        setting = f"{key}={default}"
        if doc and len(setting) > KEY_WIDTH:  # a long default: its doc on the next line
            lines += [f"  {setting}", f"  {'':<{KEY_WIDTH}}  {doc}"]
        else:
            lines.append(f"  {setting:<{KEY_WIDTH}}  {doc}".rstrip())
    lines += ["", "Hydra's own: --cfg job (the composed config), --hydra-help. docs/config.md has the details."]
    return "\n".join(lines)
