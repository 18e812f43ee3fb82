"""Experiment tracking with Weights & Biases: one ``wandb:`` block in every run config.

Off unless ``wandb.project`` is set (a run without it behaves as if wandb were not installed). Mode
``auto`` is online when the user has logged in (``WANDB_API_KEY`` or ``wandb login``), offline
otherwise; an explicit ``WANDB_MODE`` in the environment wins. Offline runs are written under the
run folder (``<run folder>/wandb/offline-run-*``) and can be uploaded later with ``wandb sync``.
"""

from __future__ import annotations

import netrc
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .config import ConfigError

MODES = ("auto", "online", "offline", "disabled")


@dataclass
class WandbConfig:
    project: Optional[str] = None     # W&B project; None: no tracking
    entity: Optional[str] = None
    mode: str = "auto"                # auto: online when logged in, else offline | online | offline | disabled
    tags: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"key 'wandb.mode': '{self.mode}' is not one of {MODES}")


def logged_in() -> bool:
    """Whether W&B credentials exist (an API key in the environment or in ~/.netrc from ``wandb login``)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def resolve_mode(cfg: WandbConfig) -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if cfg.mode != "auto":
        return cfg.mode
    return "online" if logged_in() else "offline"


class Tracker:
    """A W&B run (or nothing, when tracking is off): ``log``, ``summary``, ``finish``."""

    def __init__(self, run=None):
        self.run = run

    @property
    def enabled(self) -> bool:
        return self.run is not None

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(metrics)

    def table(self, key: str, frame) -> None:
        """A pandas frame as a W&B table (e.g. the trials of a sweep or study)."""
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(dataframe=frame.astype(str))})

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.finish()


def start_tracking(cfg: WandbConfig, folder: str | Path, name: str, config: dict | None = None,
                   group: str | None = None, job_type: str | None = None) -> Tracker:
    """A :class:`Tracker` writing under ``folder``; a no-op one when ``cfg.project`` is unset."""
    if not cfg.project or resolve_mode(cfg) == "disabled":
        return Tracker()
    import wandb

    Path(folder).mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=cfg.project, entity=cfg.entity, mode=resolve_mode(cfg), dir=str(folder), name=name,
                     group=group, job_type=job_type, tags=list(cfg.tags), config=config or {},
                     reinit="create_new")
    return Tracker(run)
