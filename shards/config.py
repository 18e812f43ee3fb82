"""Typed run configuration: a dataclass schema, a YAML file, then ``key=value`` overrides.

Every component of mskfm declares one dataclass schema and loads it with :func:`load_config`.
Validation happens once, before any work: an unknown key or a value of the wrong type raises
:class:`ConfigError` naming the key (and the file it came from).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
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
