"""The one config door of every package: a dataclass schema, a YAML file, then ``key=value`` overrides,
and the command-line pattern that feeds it.

Every component of mskfm declares one dataclass schema and loads it with :func:`load_config`.
Validation happens once, before any work: an unknown key or a value of the wrong type raises
:class:`ConfigError` naming the key (and the file it came from). Every CLI is a table of
:class:`Command` entries run by :func:`run_cli`: ``key=value`` overrides are accepted anywhere on the
line, and a :class:`UserError` (a problem the user can fix) is printed to stderr with exit status 2.
This module imports only the standard library and OmegaConf, so every layer (``cluster`` too) may use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class UserError(Exception):
    """A problem the user can fix (a bad key, a missing file, refused input): CLIs print the message
    to stderr and exit with status 2, without a traceback."""


class ConfigError(UserError, ValueError):
    """A configuration problem, with the offending key in the message."""


def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    msg = str(exc).splitlines()[0]
    return f"key '{key}': {msg}" if key else msg


def load_config(
    schema: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    base: dict | None = None,
) -> T:
    """Build a validated ``schema`` instance from defaults ← ``base`` ← YAML ``path`` ← overrides.

    ``overrides`` are OmegaConf dotlist items such as ``synth.n_patients=20``. Unknown keys and
    type mismatches raise :class:`ConfigError`.
    """
    cfg = OmegaConf.structured(schema)
    layers: list[tuple[str, Any]] = []
    if base:
        layers.append(("<base>", base))
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            layers.append((str(p), OmegaConf.load(p)))
        except Exception as exc:  # YAML syntax errors carry the line in their message
            raise ConfigError(f"{p}: cannot parse YAML: {exc}") from exc
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
    if overrides:
        try:
            layers.append(("command line", OmegaConf.from_dotlist(list(overrides))))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"command line: {_describe(exc)}") from exc
    for origin, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{origin}: {_describe(exc)}") from exc
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc)) from exc
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj  # type: ignore[return-value]


def to_dict(cfg: Any) -> dict:
    """A plain, JSON/YAML-serialisable dict of a config dataclass (or DictConfig)."""
    if dataclasses.is_dataclass(cfg):
        cfg = OmegaConf.structured(cfg)
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(to_yaml(cfg))


def lookup(registry: dict, name: str, what: str):
    """Registry access: an unknown name lists the known ones."""
    try:
        return registry[name]
    except KeyError:
        known = ", ".join(sorted(registry)) or "(none)"
        raise ConfigError(f"unknown {what} '{name}'; known: {known}") from None


# -- the command-line pattern ----------------------------------------------------------------------

class Command(NamedTuple):
    """One subcommand: ``add_arguments(parser)`` declares its flags, ``run(args) -> exit code`` runs it
    (parse -> load config -> call the library -> print)."""

    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    help: str


class OverridesParser(argparse.ArgumentParser):
    """Accepts ``key=value`` overrides anywhere on the line, also after options
    (``--task knee-dx train.epochs=3 --run-dir X train.lr=0.01``): argparse alone rejects
    positionals that follow an option once the ``overrides`` positional was filled."""

    def parse_known_args(self, args=None, namespace=None):
        ns, extras = super().parse_known_args(args, namespace)
        if hasattr(ns, "overrides"):
            pairs = [a for a in extras if "=" in a and not a.startswith("-")]
            ns.overrides = list(ns.overrides or []) + pairs
            extras = [a for a in extras if a not in pairs]
        return ns, extras


def build_cli(prog: str, description: str, commands: dict[str, Command],
              add_global: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.ArgumentParser:
    """The parser of a command table: one subparser per entry (``args.command`` names it)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    if add_global:
        add_global(parser)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OverridesParser)
    for name, (add_arguments, _, help_text) in commands.items():
        add_arguments(sub.add_parser(name, help=help_text))
    return parser


def run_cli(parser: argparse.ArgumentParser, commands: dict[str, Command], argv: Sequence[str] | None = None,
            errors: tuple[type[BaseException], ...] = (), interrupts: tuple[type[BaseException], ...] = ()) -> int:
    """Parse ``argv`` and run the chosen command. A :class:`UserError` (or one of ``errors``) becomes
    ``<prog> <command>: error: <message>`` on stderr and exit status 2; one of ``interrupts`` (a
    stopped experiment whose state is saved) its message and status 130."""
    args = parser.parse_args(argv)
    _, run, _ = commands[args.command]
    try:
        return run(args)
    except (UserError, *errors) as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except interrupts as exc:
        print(f"{parser.prog} {args.command}: {exc}", file=sys.stderr)
        return 130
