"""Tasks as configs: one YAML per task in ``configs/tasks/``, validated against :class:`TaskConfig`.

A task names the joint (any anatomy of the shard set's dataset declaration), the planes, the labels (diagnosis) or structures (segmentation), one
published backbone per plane (by hub path), the feature spec, the head, the fusion, the training
budget and the metrics. ``downstream finetune --task ankle-dx`` resolves ``configs/tasks/ankle-dx.yaml``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf

from shards.config import ConfigError, load_config
from shards.runs import default_folder
from shards.dataset import DatasetDeclaration
from shards.schema import PLANES
from shards.tracking import WandbConfig

from .pooling import POOLINGS

TASKS_DIR = Path(__file__).resolve().parents[1] / "configs" / "tasks"

KINDS = ("diagnosis", "segmentation")
HEADS = {"diagnosis": ("linear", "mlp", "logistic"), "segmentation": ("decoder",)}
FUSIONS = ("concat", "projected_sum", "cross_attention", "label_level", "experts")
STORAGE_DTYPES = ("float32", "float16")
DOMAIN_KEYS = ("", "site", "vendor", "field_strength")
BASELINES = {"diagnosis": ("random_backbone", "scratch_cnn", "mrnet_2d"),
             "segmentation": ("random_backbone", "scratch_cnn")}


@dataclass
class PlaneFeatures:
    """One plane's own timesteps and blocks; an empty list keeps the task-wide ``features`` value."""

    timesteps: list[int] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)


@dataclass
class FeatureSpec:
    """Which frozen-backbone features: noise timesteps, named blocks, noise draws averaged, seed.
    ``per_plane.<plane>`` overrides timesteps and blocks for that plane (OrthoDiffusion's fusion recipe:
    sag t=200 ``mid_0``, cor t=150 ``mid_0``, ax t=50 ``mid_2``)."""

    timesteps: list[int] = field(default_factory=lambda: [50])
    blocks: list[str] = field(default_factory=lambda: ["mid"])
    noise_draws: int = 1
    seed: int = 0
    pooling: str = "attention"
    batch_size: int = 4
    per_plane: dict[str, PlaneFeatures] = field(default_factory=dict)
    # missing cache entries: 0 = computed in this process; N = on N Ray actors (downstream/extract.py)
    workers: int = 0
    worker_threads: int = 1           # torch threads (and Ray CPUs) per worker
    chunk_rows: int = 64              # studies per feature unit (a multiple of batch_size)
    worker_env: dict[str, str] = field(default_factory=dict)  # env of the workers, e.g. AWS_ENDPOINT_URL
    volume_dtype: str = "float32"     # storage of preprocessed volumes: float32 or float16
    feature_dtype: str = "float32"    # storage of features: float32 or float16 (docs/perf/scale.md: the loss)

    def for_plane(self, plane: str) -> "FeatureSpec":
        """The spec one plane's features are computed (and cached) with."""
        own = self.per_plane.get(plane, PlaneFeatures())
        return replace(self, timesteps=list(own.timesteps or self.timesteps), blocks=list(own.blocks or self.blocks),
                       per_plane={})


@dataclass
class HeadSpec:
    """Head on pooled features: ``linear``, ``mlp`` or ``logistic`` (the closed-form reference probe,
    :mod:`downstream.heads.probe`). ``finetune_blocks``: backbone parameter-name prefixes to unfreeze
    (trained at ``lr * finetune_lr_scale``); empty = frozen backbone and cached features."""

    kind: str = "linear"
    hidden: int = 64
    dropout: float = 0.1
    finetune_blocks: list[str] = field(default_factory=list)
    finetune_lr_scale: float = 0.1


@dataclass
class FusionSpec:
    """Multi-plane fusion. ``experts``: per-label plane experts + a gating network trained on
    out-of-fold, patient-level predictions (``folds`` folds)."""

    kind: str = "concat"
    hidden: int = 32
    heads: int = 2
    folds: int = 3


@dataclass
class EHRSpec:
    """Tabular encoder of the EHR record, mixed with the image prediction per label."""

    enabled: bool = False
    numeric: list[str] = field(default_factory=lambda: ["age", "height_cm", "weight_kg"])
    categorical: list[str] = field(default_factory=lambda: ["sex", "patient_type"])
    event: str = "injury_event"
    embed_dim: int = 8
    hidden: int = 32


@dataclass
class TrainSpec:
    """Training and model selection. Every choice (best epoch, early stopping after ``patience``
    epochs without improvement, the weight decay of frozen-feature heads from ``weight_decay_grid``,
    decision thresholds) is made on ``select_split`` (patients of ``train_domain``, subset by
    ``train_fraction`` like the training patients), never on ``eval_split``. ``select_split: ""``
    turns selection off (last epoch, ``weight_decay``, sensitivity/specificity not reported)."""

    epochs: int = 60
    lr: float = 3e-3
    weight_decay: float = 1e-4
    weight_decay_grid: list[float] = field(default_factory=lambda: [1e-4, 1e-2, 1e-1])
    select_split: str = "val"
    patience: int = 10
    batch_size: int = 16
    seed: int = 0
    train_split: str = "train"
    eval_split: str = "test"
    train_fraction: float = 1.0
    cover_labels: bool = False  # a fraction's subset starts with one positive patient per label (see data.py)
    domain_key: str = ""        # "", site, vendor or field_strength: train/evaluate on one domain
    train_domain: str = ""
    eval_domain: str = ""


@dataclass
class ProbeSpec:
    """The reference probe reported next to every diagnosis head (``probe``, and
    ``random_backbone_probe`` with the ``random_backbone`` baseline): ``cs`` values of C on
    scikit-learn's log grid, chosen by ``folds``-fold patient-grouped CV on the training rows."""

    enabled: bool = True
    cs: int = 10
    folds: int = 5


@dataclass
class MetricsSpec:
    bootstrap: int = 1000
    ci: float = 0.95
    seed: int = 0


@dataclass
class BaselineSpec:
    """Baselines trained in the same run; widths are kept small so they train on CPU. The pixel models
    train ``epochs`` epochs, or more when that is fewer than ``min_steps`` optimizer steps: a fixed
    epoch count gives a small label fraction few gradient steps, so a label-efficiency curve would
    measure the step budget along with the labels (:meth:`epochs_for`)."""

    names: list[str] = field(default_factory=lambda: ["random_backbone", "scratch_cnn", "mrnet_2d"])
    cnn_channels: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    encoder_2d: str = "resnet18"
    epochs: int = 20
    min_steps: int = 0
    lr: float = 1e-3

    def epochs_for(self, n_train: int, batch_size: int) -> int:
        """Epochs for ``n_train`` training studies: ``epochs``, raised to reach ``min_steps`` steps."""
        steps_per_epoch = max(1, math.ceil(n_train / batch_size))
        return max(self.epochs, math.ceil(self.min_steps / steps_per_epoch))


@dataclass
class TaskConfig:
    name: str = ""
    description: str = ""
    kind: str = "diagnosis"
    joint: str = "knee"
    planes: list[str] = field(default_factory=lambda: ["sag"])
    labels: list[str] = field(default_factory=list)
    structures: list[str] = field(default_factory=list)
    ignore_index: int = 255
    backbones: dict[str, str] = field(default_factory=dict)
    shards: str = "data/shards"
    cache_dir: str = "cache/features"
    out: str = field(default_factory=default_folder("finetune"))
    run_name: str = ""
    device: str = "cpu"
    threads: int = 0
    features: FeatureSpec = field(default_factory=FeatureSpec)
    head: HeadSpec = field(default_factory=HeadSpec)
    fusion: FusionSpec = field(default_factory=FusionSpec)
    ehr: EHRSpec = field(default_factory=EHRSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    probe: ProbeSpec = field(default_factory=ProbeSpec)
    metrics: MetricsSpec = field(default_factory=MetricsSpec)
    baselines: BaselineSpec = field(default_factory=BaselineSpec)
    wandb: WandbConfig = field(default_factory=WandbConfig)    # W&B tracking; off without wandb.project

    def validate(self) -> None:
        where = f"task '{self.name}'"
        _one_of(self.kind, KINDS, f"{where}: kind")
        if self.threads < 0:
            raise ConfigError(f"{where}: threads must be >= 0 (0 = torch's default), got {self.threads}")
        if not self.joint:
            raise ConfigError(f"{where}: joint is empty (an anatomy of the shards: `downstream tasks --shards <dir>`)")
        if not self.planes:
            raise ConfigError(f"{where}: planes is empty; known: {', '.join(PLANES)}")
        for plane in self.planes:
            _one_of(plane, PLANES, f"{where}: plane")
        missing = [p for p in self.planes if p not in self.backbones]
        if missing:
            raise ConfigError(f"{where}: no backbone for plane(s) {missing}; backbones given for "
                              f"{sorted(self.backbones) or 'none'}")
        if self.kind == "diagnosis" and not self.labels:
            raise ConfigError(f"{where}: labels is empty (the labels of the shards: `downstream tasks --shards <dir>`)")
        if self.kind == "segmentation":
            if not self.structures:
                raise ConfigError(f"{where}: structures is empty (the structures of the shards: "
                                  f"`downstream tasks --shards <dir>`)")
            if len(self.planes) != 1:
                raise ConfigError(f"{where}: segmentation works on one plane, got {self.planes}")
        _one_of(self.features.pooling, POOLINGS, f"{where}: features.pooling")
        _one_of(self.head.kind, HEADS[self.kind], f"{where}: head.kind")
        _one_of(self.fusion.kind, FUSIONS, f"{where}: fusion.kind")
        for name in self.baselines.names:
            _one_of(name, BASELINES[self.kind], f"{where}: baseline")
        if self.baselines.epochs < 1 or self.baselines.min_steps < 0:
            raise ConfigError(f"{where}: baselines.epochs must be >= 1 and baselines.min_steps >= 0, got "
                              f"{self.baselines.epochs} and {self.baselines.min_steps}")
        if len(self.baselines.cnn_channels) != 4:
            raise ConfigError(f"{where}: baselines.cnn_channels needs 4 widths (one per ResNet stage), "
                              f"got {self.baselines.cnn_channels}")
        if self.ehr.enabled and self.kind != "diagnosis":
            raise ConfigError(f"{where}: ehr fusion needs a diagnosis task")
        if self.ehr.enabled and self.fusion.kind == "experts" and len(self.planes) > 1:
            raise ConfigError(f"{where}: ehr fusion mixes one image model with the EHR head; plane experts "
                              f"(fusion.kind=experts) are several: use concat, projected_sum or label_level")
        if not self.features.timesteps or not self.features.blocks or self.features.noise_draws < 1:
            raise ConfigError(f"{where}: features need timesteps, blocks and noise_draws >= 1")
        f = self.features
        if f.workers < 0 or f.worker_threads < 0 or f.chunk_rows < 1 or f.chunk_rows % f.batch_size:
            raise ConfigError(f"{where}: features.workers and features.worker_threads must be >= 0 and "
                              f"features.chunk_rows a positive multiple of features.batch_size ({f.batch_size}), "
                              f"got {f.workers}, {f.worker_threads}, {f.chunk_rows}")
        _one_of(f.volume_dtype, STORAGE_DTYPES, f"{where}: features.volume_dtype")
        _one_of(f.feature_dtype, STORAGE_DTYPES, f"{where}: features.feature_dtype")
        extra = sorted(set(self.features.per_plane) - set(self.planes))
        if extra:
            raise ConfigError(f"{where}: features.per_plane has planes {extra} that are not task planes {self.planes}")
        if not 0 < self.train.train_fraction <= 1:
            raise ConfigError(f"{where}: train.train_fraction must be in (0, 1], got {self.train.train_fraction}")
        _one_of(self.train.domain_key, DOMAIN_KEYS, f"{where}: train.domain_key")
        if self.head.finetune_blocks and (self.kind != "diagnosis" or self.fusion.kind == "experts"):
            raise ConfigError(f"{where}: head.finetune_blocks works with diagnosis heads on feature/label-level "
                              f"fusion, not with fusion.kind=experts or segmentation")
        if self.head.kind == "logistic" and (self.head.finetune_blocks or self.ehr.enabled
                                             or (len(self.planes) > 1 and self.fusion.kind != "concat")):
            raise ConfigError(f"{where}: head.kind=logistic is a closed-form probe on concatenated frozen features: "
                              f"it needs fusion.kind=concat, no head.finetune_blocks and no ehr")
        if self.train.patience < 0 or not self.train.weight_decay_grid or self.probe.folds < 2 or self.probe.cs < 1:
            raise ConfigError(f"{where}: train.patience must be >= 0, train.weight_decay_grid non-empty, "
                              f"probe.folds >= 2 and probe.cs >= 1")
        if self.fusion.kind == "experts" and self.fusion.folds < 2:
            raise ConfigError(f"{where}: fusion.folds must be >= 2 for experts")


def check_vocabulary(task: TaskConfig, dataset: DatasetDeclaration, where: str) -> None:
    """The task's anatomy, labels and structures must be declared by the shard set; errors name those that are."""
    if task.joint not in dataset.anatomies:
        raise ConfigError(f"{where}: anatomy (joint) '{task.joint}' is not in the dataset; anatomies: "
                          f"{', '.join(dataset.anatomies)}")
    spec = dataset.anatomies[task.joint]
    if task.kind == "diagnosis":
        bad = [name for name in task.labels if name not in spec.labels]
        if bad:
            raise ConfigError(f"{where}: unknown {task.joint} labels {bad}; known: {', '.join(spec.labels) or 'none'}")
    else:
        bad = [s for s in task.structures if s not in spec.structures]
        if bad:
            raise ConfigError(f"{where}: structures {bad} are not {task.joint} structures; "
                              f"known: {', '.join(spec.structures) or 'none'}")


def describe_vocabulary(dataset: DatasetDeclaration) -> list[str]:
    """What a shard set offers to tasks: per anatomy its labels (with type and classes) and structures."""
    lines = [f"dataset {dataset.name or '?'}: planes {', '.join(dataset.planes)}"]
    for anatomy, spec in dataset.anatomies.items():
        lines.append(f"{anatomy}:")
        labels = [name if s.type == "binary" else f"{name} ({s.type}: {', '.join(s.classes)})"
                  for name, s in spec.labels.items()]
        lines.append(f"  labels: {', '.join(labels) or 'none'}")
        lines.append(f"  structures: {', '.join(f'{n}={v}' for n, v in spec.structures.items()) or 'none'}")
    if dataset.ehr:
        lines.append("ehr: " + ", ".join(f"{n} ({f.type}{', ' + f.unit if f.unit else ''})" for n, f in dataset.ehr.items()))
    return lines


def _one_of(value: str, known: Sequence[str], what: str) -> None:
    if value not in known:
        raise ConfigError(f"{what} '{value}' is unknown; known: {', '.join(known)}")


def task_registry(tasks_dir: str | Path = TASKS_DIR) -> dict[str, Path]:
    """Task name -> YAML path, for every ``*.yaml`` in ``tasks_dir``."""
    return {p.stem: p for p in sorted(Path(tasks_dir).glob("*.yaml"))}


def describe_tasks(tasks_dir: str | Path = TASKS_DIR) -> list[str]:
    """One line per task: name, kind, joint, planes, description."""
    lines = []
    for name, path in task_registry(tasks_dir).items():
        raw = OmegaConf.load(path)
        planes = ",".join(raw.get("planes", []))
        lines.append(f"{name:<14} {raw.get('kind', 'diagnosis'):<12} {raw.get('joint', '?'):<9} "
                     f"{planes:<11} {raw.get('description', '')}")
    return lines


def load_task(name_or_path: str | Path, overrides: Sequence[str] = (),
              tasks_dir: str | Path = TASKS_DIR) -> TaskConfig:
    """A validated task from its name (``configs/tasks/<name>.yaml``) or a YAML path, plus overrides."""
    path = Path(name_or_path)
    if not path.suffix:
        registry = task_registry(tasks_dir)
        if str(name_or_path) not in registry:
            raise ConfigError(f"unknown task '{name_or_path}'; known: {', '.join(registry) or '(none)'}")
        path = registry[str(name_or_path)]
    cfg = load_config(TaskConfig, path, overrides, base={"name": path.stem})
    return cfg
