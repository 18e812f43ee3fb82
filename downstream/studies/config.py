"""The study config (``configs/sweeps/<kind>.yaml``): one schema for the four kinds, each kind reads
the keys it needs. ``quick:`` holds the reduced grid that ``--quick`` merges over the full one."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from shards.config import ConfigError, load_config, to_dict
from shards.runs import default_folder
from shards.tracking import WandbConfig

from ..tuning import RayConnection


KINDS = ("label-efficiency", "transfer", "robustness", "multi-anatomy")
SWEEPS_DIR = Path(__file__).resolve().parents[2] / "configs" / "sweeps"


@dataclass
class StudyBackboneSpec:
    """How ``--make-backbones`` pretrains the grid's missing backbones: a small 3D diffusion U-Net run
    by the pretraining engine (:func:`pretrain.run.train`), the given joints mixed with equal weights,
    ``size`` studies capped by ``data.max_studies`` (nested subsets, seed ``seed``)."""

    channels: list[int] = field(default_factory=lambda: [4, 8])
    shape: list[int] = field(default_factory=list)    # [] = the shards' common shape of the plane
    num_train_timesteps: int = 100
    steps: int = 30
    batch_size: int = 4
    lr: float = 2e-3
    seed: int = 0
    launcher: str = "local"                          # pretraining launcher: local | ray | torchrun
    overrides: list[str] = field(default_factory=list)   # any further pretraining key=value


@dataclass
class StudyConfig:
    kind: str = "label-efficiency"
    name: str = ""
    out: str = field(default_factory=default_folder("study"))
    task: str = "knee-dx"                       # the task (label-efficiency, robustness, multi-anatomy)
    targets: list[str] = field(default_factory=list)          # transfer: target tasks
    overrides: list[str] = field(default_factory=list)        # task overrides for every trial
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    metric: str = "auroc"                       # macro metric in tables and plots: auroc | ap
    ci: float = 0.95
    fractions: list[float] = field(default_factory=lambda: [0.01, 0.05, 0.1, 0.25, 0.5, 1.0])
    hub: str = "hub/study"                      # transfer/multi-anatomy: backbones at <hub>/<name>-<plane>
    sources: dict[str, list[str]] = field(default_factory=dict)   # backbone name -> joints pretrained on
    sizes: list[int] = field(default_factory=lambda: [0])         # multi-anatomy: pretraining studies (0 = all)
    domain_key: str = "field_strength"          # robustness: site | vendor | field_strength
    domains: list[str] = field(default_factory=list)              # robustness: [] = every value in the data
    make_backbones: StudyBackboneSpec = field(default_factory=StudyBackboneSpec)
    resources: dict[str, float] = field(default_factory=lambda: {"cpu": 1.0})
    max_concurrent_trials: int = 2
    ray: RayConnection = field(default_factory=RayConnection)
    wandb: WandbConfig = field(default_factory=WandbConfig)   # W&B record of the study (trials table)
    quick: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"study kind '{self.kind}' is unknown; known: {', '.join(KINDS)}")
        bad = [f for f in self.fractions if not 0 < f <= 1]
        if bad:
            raise ConfigError(f"study {self.kind}: fractions {bad} are outside (0, 1]")
        if not self.seeds:
            raise ConfigError(f"study {self.kind}: seeds is empty")
        if self.metric not in ("auroc", "ap"):
            raise ConfigError(f"study {self.kind}: metric '{self.metric}' is unknown; known: auroc, ap")
        if any(s < 0 for s in self.sizes):
            raise ConfigError(f"study {self.kind}: sizes must be >= 0 (0 = all studies), got {self.sizes}")
        if self.kind in ("transfer", "multi-anatomy") and not self.sources:
            raise ConfigError(f"study {self.kind}: sources is empty; give name: [joints] per pretraining source")
        if self.kind == "transfer" and not self.targets:
            raise ConfigError("study transfer: targets is empty; give the target tasks, e.g. [ankle-dx, shoulder-dx]")


def load_study(kind: str, space: str | Path | None = None, overrides: Sequence[str] = (),
               quick: bool = False) -> StudyConfig:
    """The study config from ``space`` (default ``configs/sweeps/<kind>.yaml``), the keys of its
    ``quick`` block when ``quick``, then ``key=value`` overrides."""
    path = Path(space) if space else SWEEPS_DIR / f"{kind}.yaml"
    cfg = load_config(StudyConfig, path, [], base={"kind": kind})
    if cfg.kind != kind:
        raise ConfigError(f"{path} defines a '{cfg.kind}' study, not '{kind}'")
    base = to_dict(cfg)
    if quick:  # each key of quick replaces the full value (a dict of sources is not merged)
        base = base | OmegaConf.to_container(OmegaConf.create(cfg.quick))
    return load_config(StudyConfig, None, overrides, base=base)
