"""Resuming a run folder: its saved configuration must still describe what the run is doing.

Every resumable command (``shards build``/``ingest``, ``pretrain run``, ``downstream sweep`` and
``study``, recon studies) calls :func:`check_resume` before it writes: a rerun under the same name
continues only when the keys that shape its results are unchanged; otherwise it is refused, naming
each changed key with its old and new value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .config import ConfigError


def changed_keys(before: Any, now: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (a key on one side only counts)."""
    if isinstance(before, dict) and isinstance(now, dict):
        out = []
        for key in sorted(set(before) | set(now), key=str):
            out += changed_keys(before.get(key), now.get(key), f"{prefix}{key}.")
        return out
    return [] if before == now else [prefix.rstrip(".")]


def _covered(key: str, names: Sequence[str]) -> bool:
    return any(key == n or key.startswith(n + ".") for n in names)


def check_resume(before: dict | None, now: dict, where: str | Path, what: str = "run",
                 keys: Sequence[str] | None = None, ignore: Sequence[str] = (),
                 fix: str = "give it a new name or remove the folder") -> None:
    """Refuse to resume ``where`` when the saved configuration ``before`` differs from ``now``.

    ``keys`` limits the comparison to these top-level or dotted keys (None: all); ``ignore`` lists
    keys that may change between runs (worker counts, logging). Nothing to compare (``before`` is
    None) passes.
    """
    if before is None:
        return
    changed = [k for k in changed_keys(before, now)
               if (keys is None or _covered(k, keys)) and not _covered(k, ignore)]
    if changed:
        def value(cfg, key):
            for part in key.split("."):
                cfg = cfg.get(part) if isinstance(cfg, dict) else None
            return cfg

        detail = "; ".join(f"{k}: {value(before, k)!r} -> {value(now, k)!r}" for k in changed)
        raise ConfigError(f"{where} holds a {what} with other {', '.join(changed)} ({detail}); {fix}")


def saved_yaml(path: str | Path) -> dict | None:
    """A saved ``config.yaml`` as a plain dict, or None when there is none."""
    from omegaconf import OmegaConf

    path = Path(path)
    if not path.is_file():
        return None
    return OmegaConf.to_container(OmegaConf.load(path))  # type: ignore[return-value]
