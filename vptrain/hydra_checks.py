"""What the CLI checks around Hydra: overrides against the schema, Hydra's errors in one line, and
the config checks that must run after composition but before Hydra writes the run directory.

Hydra accepts `+train.stepz=3` (a `+` adds a key the schema lacks, which vptrain would then
ignore) and reports a parse or composition error in 6-8 lines that need not name the key. The CLI
checks every override here before Hydra composes, and turns whatever Hydra still raises into one
line that names the override. Hydra creates the run directory (and writes .hydra/ and a log file
into it) before it calls the task; `CheckBeforeLaunch.on_run_start` runs just before that.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import sys
import typing
from collections.abc import Callable
from contextlib import contextmanager
from functools import cache

from hydra.experimental.callback import Callback

from vptrain.config import RunConfig

SCHEMA_SOURCE = "vptrain/config.py"


@cache
def _fields(cls: type) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def schema_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, nested sections included."""
    keys = []
    for name, kind in _fields(cls).items():
        keys.append(prefix + name)
        if dataclasses.is_dataclass(kind):
            keys += schema_keys(kind, f"{prefix}{name}.")  # type: ignore[arg-type]
    return keys


def unknown_key_message(key: str) -> str | None:
    """None when `key` is in the schema (or below a non-section field, e.g. a list's element);
    otherwise what to say, with the closest known key."""
    cls: object = RunConfig
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            return None
        fields = _fields(cls)  # type: ignore[arg-type]
        if part not in fields:
            known = ".".join(parts[:depth])
            section = f"'{known}'" if known else "the config"
            return f"{key}: no such key in {section} (the schema, {SCHEMA_SOURCE}){_suggest(key, fields, depth)}"
        cls = fields[part]
    return None


def _suggest(key: str, siblings: dict[str, object], depth: int) -> str:
    parts = key.split(".")
    near = difflib.get_close_matches(parts[depth], list(siblings), n=1, cutoff=0.6)
    if near:
        return f"; did you mean {'.'.join(parts[:depth] + near)}?"
    # A known leaf under another section (train.lr -> optim.lr).
    full = difflib.get_close_matches(key, schema_keys(), n=1, cutoff=0.6)
    leaf = [k for k in schema_keys() if k.rsplit(".", 1)[-1] == parts[-1]]
    best = leaf[:1] or full
    return f"; did you mean {best[0]}?" if best else ""


def check_overrides(args: list[str], groups: set[str]) -> None:
    """Parse the command line's overrides as Hydra will, and refuse keys the schema lacks (with or
    without `+`). `groups` are the config groups (conf/ subdirectories): `model=gpt-4b` selects an
    option, it does not set a key. Raises ValueError with one line naming the override."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    overrides = [a for a in args if not a.startswith("-") and ("=" in a or a.startswith("~"))]
    parser = OverridesParser.create()
    for text in overrides:
        try:
            [override] = parser.parse_overrides([text])
        except OverrideParseException as err:
            raise ValueError(parse_error_line(text, err.message)) from None
        key = override.key_or_group
        if key.split(".")[0].split("/")[0] == "hydra" or "/" in key or override.package is not None:
            continue
        if "." not in key and key in groups:
            continue
        message = unknown_key_message(key)
        if message:
            raise ValueError(message)


def parse_error_line(override: str, message: str) -> str:
    key = override.split("=", 1)[0].lstrip("+~")
    reason = message.strip().splitlines()[0] if message.strip() else "syntax error"
    return (f"{key}: cannot parse the override '{override}' ({reason}); close every bracket and brace "
            "(a list is key=[a,b], a dict key={a:1}) and quote the override for the shell")


def check_composed_keys(node, cls: type = RunConfig, prefix: str = "") -> None:
    """Every key of the composed DictConfig is in the schema (catches keys a YAML file or a
    `+section={...}` added)."""
    from omegaconf import DictConfig

    fields = _fields(cls)
    for name in node.keys():
        key = f"{prefix}{name}"
        if name not in fields:
            raise ValueError(unknown_key_message(key) or f"{key}: no such key in the schema ({SCHEMA_SOURCE})")
        kind = fields[name]
        child = node._get_node(name)
        if dataclasses.is_dataclass(kind) and isinstance(child, DictConfig) and not child._is_none():
            check_composed_keys(child, kind, key + ".")  # type: ignore[arg-type]


def hydra_error_line(err: BaseException) -> str:
    """One line for an error Hydra raised while parsing or composing (it would print 6-8)."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(err, OverrideParseException):
        return parse_error_line(err.override, err.message)
    if isinstance(err, MissingConfigException):
        missing = err.missing_cfg_file or ""
        group, _, option = missing.rpartition("/")
        options = f"; choose one of {', '.join(err.options)}" if err.options else ""
        if group:
            return f"{group.replace('/', '.')}: no option '{option}' in conf/{group}/{options}"
        return _first_line(err)
    cause = err.__cause__
    key = getattr(cause, "full_key", None)
    if cause is not None and key:
        return f"{key}: {_first_line(cause)} ({_first_line(err)})"
    if cause is not None:
        return f"{_first_line(err)}: {_first_line(cause)}"
    return _first_line(err)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].strip() if text else type(err).__name__


@contextmanager
def hydra_raises():
    """Let Hydra raise its errors instead of printing them (so the CLI can print one line)."""
    before = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = before


def callback_overrides(command: str) -> list[str]:
    """Hydra overrides that install CheckBeforeLaunch for `command`."""
    target = f"{CheckBeforeLaunch.__module__}.{CheckBeforeLaunch.__qualname__}"
    return [f"+hydra.callbacks.vptrain_checks._target_={target}", f"+hydra.callbacks.vptrain_checks.command={command}"]


def config_error(command: str, err: BaseException) -> None:
    print(f"vptrain {command}: config error: {err}", file=sys.stderr, flush=True)
    sys.exit(2)


class CheckBeforeLaunch(Callback):
    """Validate (and, for `train`, run the pre-launch checks) between Hydra's composition and its
    creating the run directory: a bad config leaves nothing behind, not even .hydra/."""

    def __init__(self, command: str) -> None:
        self.command = command

    def on_run_start(self, config, **kwargs) -> None:
        from vptrain.cli import materialize
        from vptrain.launch.env import external_launch
        from vptrain.preflight import check_run_dir, preflight

        try:
            run_dir = str(config.hydra.run.dir)
            check_run_dir(run_dir)
            task = copy.deepcopy(config)
            with _writable(task):
                del task["hydra"]
            cfg = materialize(task, hydra_cfg=config.hydra, output_dir=run_dir)
            if self.command in ("train", "eval"):
                launch = external_launch()
                preflight(cfg, launch)
                # One job per run directory (vptrain/run_lock.py): locked before Hydra writes .hydra/
                # and its log there, held for this process's life; the launcher shares this lock.
                from vptrain.run_lock import acquire

                self.run_lock = acquire(cfg.run_dir)
        except ValueError as err:
            config_error(self.command, err)

    def on_multirun_start(self, config, **kwargs) -> None:
        from vptrain.preflight import check_run_dir

        try:
            check_run_dir(str(config.hydra.sweep.dir), "hydra.sweep.dir")
        except ValueError as err:
            config_error(self.command, err)


def _writable(node) -> Callable:
    from omegaconf import open_dict, read_write

    @contextmanager
    def both():
        with read_write(node), open_dict(node):
            yield

    return both()
