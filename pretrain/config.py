"""Typed schema of a pretraining run (``configs/pretrain/*.yaml`` + ``key=value`` overrides).

One run trains one backbone per plane of ``planes`` (each a separate DeepSpeed job with its own
checkpoints, ``<storage_path>/<name>/<plane>/``). ``model`` and ``schedule`` are free-form
keyword dicts handed to the objective, so a new objective needs no schema change.

Data: the studies of ``joint``, or of several ``joints`` sampled with their mixing weights (balanced
across anatomies, as in MosaicMRI), optionally capped at ``data.max_studies`` studies, a seeded
subset nested across caps (the studies of a smaller cap are among those of a larger one) that keeps a
study of every anatomy of the mix (:func:`pretrain.objectives.study_subset`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from shards.config import ConfigError
from shards.runs import default_folder
from shards.tracking import WandbConfig

LAUNCHERS = ("local", "torchrun", "ray")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 10       # linear warm-up, then cosine decay to min_lr_ratio * lr
    total_steps: int = 100       # optimizer steps (each = grad_accum micro-batches per worker)
    min_lr_ratio: float = 0.0
    grad_accum: int = 1
    clip: float = 1.0            # gradient-norm clipping; 0 disables


@dataclass
class DataConfig:
    source: str = "data/shards/demo"  # folder or URL of the study (or recon) shards' manifest
    split: str = "train"
    num_workers: int = 1              # DataLoader worker processes per training worker
    prefetch: int = 2                 # batches prefetched per DataLoader worker
    shuffle_buffer: int = 16
    max_studies: int = 0              # cap: the first N of a seeded, anatomy-stratified order of the split's studies; 0 = all
    subset_seed: int = 0              # seed of that permutation: for one seed, smaller caps are nested in larger


@dataclass
class RayConfig:
    address: Optional[str] = None     # None: start a local Ray in-process; else join this cluster
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    max_failures: int = 2             # worker-group restarts from the last checkpoint
    concurrent_planes: bool = False   # train the planes as concurrent Ray Train runs


@dataclass
class PretrainConfig:
    name: str = "tiny"
    objective: str = "diffusion"
    joint: str = "knee"
    joints: dict[str, float] = field(default_factory=dict)  # several anatomies: {joint: mixing weight}; {} = joint
    planes: list[str] = field(default_factory=lambda: ["sag", "cor", "ax"])
    shape: list[int] = field(default_factory=lambda: [8, 32, 32])  # (slices, rows, cols) per plane
    intensity: str = "percentile"     # percentile: dataset-wide window; volume: per-volume clip + z-score;
                                      # minmax: per-volume min-max to [-1, 1] (OrthoDiffusion)
    spatial: str = "resize"           # resize (trilinear) | pad_crop | crop_resize (OrthoDiffusion: slices cropped)
    model: dict[str, Any] = field(default_factory=dict)
    schedule: dict[str, Any] = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    batch_size: int = 2               # micro-batch per worker
    zero_stage: int = 1
    precision: str = "auto"           # auto: bf16 on GPUs that support it, fp32 otherwise
    ema_decay: float = 0.999
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 10
    launcher: str = "ray"
    storage_path: str = field(default_factory=default_folder("pretrain"))  # checkpoints: folder or s3:// URL
    run_root: str = field(default_factory=default_folder("pretrain"))      # config.yaml, metrics.json(l), logs
    seed: int = 0
    wandb: WandbConfig = field(default_factory=WandbConfig)  # W&B tracking by rank 0; off without a project

    def validate(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ConfigError(f"key 'launcher': '{self.launcher}' is not one of {LAUNCHERS}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"key 'precision': '{self.precision}' is not one of {PRECISIONS}")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"key 'zero_stage': {self.zero_stage} must be 0, 1 or 2")
        if self.objective == "diffusion" and not self.joint:
            raise ConfigError("key 'joint': an anatomy of the shards is required (checked against them at start)")
        for joint, weight in self.joints.items():
            if not weight > 0:
                raise ConfigError(f"key 'joints.{joint}': joint weights must be > 0")
        if self.objective not in ("diffusion", "seg3d") and (self.joints or self.data.max_studies):
            raise ConfigError(f"keys 'joints' and 'data.max_studies' apply to the diffusion and seg3d objectives; objective "
                              f"'{self.objective}' trains on its whole source (recon studies write subsets: "
                              "`pretrain recon-study`)")
        if self.data.max_studies < 0:
            raise ConfigError(f"key 'data.max_studies': {self.data.max_studies} must be >= 0 (0 = all studies)")
        if not self.planes or len(set(self.planes)) != len(self.planes):
            raise ConfigError(f"key 'planes': {self.planes} must be a non-empty list without repeats")
        if self.intensity not in ("percentile", "volume", "minmax"):
            raise ConfigError(f"key 'intensity': '{self.intensity}' is not one of ('percentile', 'volume', 'minmax')")
        if self.spatial not in ("resize", "pad_crop", "crop_resize"):
            raise ConfigError(f"key 'spatial': '{self.spatial}' is not one of ('resize', 'pad_crop', 'crop_resize')")
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ConfigError(f"key 'shape': {self.shape} must be three positive sizes (S, R, C)")
        if "/" in self.name or not self.name:
            raise ConfigError(f"key 'name': '{self.name}' must be a non-empty name without '/'")
        for key in ("batch_size", "checkpoint_every", "log_every", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ConfigError(f"key '{key}': must be >= 1, got {getattr(self, key)}")
        o = self.optim
        if o.total_steps < 1 or o.grad_accum < 1 or o.warmup_steps < 0 or o.lr <= 0:
            raise ConfigError("key 'optim': total_steps and grad_accum must be >= 1, "
                              "warmup_steps >= 0 and lr > 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"key 'ema_decay': {self.ema_decay} must be in [0, 1)")
        if self.ray.num_workers < 1:
            raise ConfigError("key 'ray.num_workers': must be >= 1")


def mixture(cfg: PretrainConfig) -> dict[str, float]:
    """The anatomies a run trains on, with their mixing weights (``joints``, else ``{joint: 1}``)."""
    return dict(cfg.joints) or {cfg.joint: 1.0}


def run_dir(cfg: PretrainConfig, plane: str | None = None) -> Path:
    """Local folder of a run (``<run_root>/<name>``) or of one plane inside it."""
    base = Path(cfg.run_root) / cfg.name
    return base / plane if plane else base


def storage_root(cfg: PretrainConfig) -> str:
    """Checkpoint root of the run: ``<storage_path>/<name>`` (absolute for local paths)."""
    if "://" in cfg.storage_path:
        return f"{cfg.storage_path.rstrip('/')}/{cfg.name}"
    return str(Path(cfg.storage_path).resolve() / cfg.name)
