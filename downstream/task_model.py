"""The task model: everything needed to apply a finetuned head to new exams, in one folder.

Every ``downstream finetune`` run writes ``<run>/model/`` through :func:`save_task_model`;
``downstream export`` copies it to a folder, ``s3://`` or ``hf://``; :func:`load_task_model` reads
it back (``downstream predict`` / ``evaluate``). Files (safetensors, JSON, YAML, markdown only —
nothing is unpickled)::

    task_model.json     format version, vocabulary (labels or structures), planes, preprocessing per
                        plane, feature channels, decision thresholds and where they came from, each
                        backbone by URL + sha256 of its weights and config
    heads.safetensors   the task's head with its feature standardisation statistics (buffers); for
                        ``head.finetune_blocks`` with its tuned backbone copies
    task_config.yaml    the resolved task config, local paths reduced to ``<local>/<name>``
    metrics.json        the run's metrics (task model and baselines) with intervals
    README.md           model card with a Hugging Face YAML header

Loading checks each backbone's sha256 against the record and refuses a mismatch, naming both.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import fsspec
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_model, save_model

from pretrain.hub import HF_PREFIX, is_local, put_folder
from pretrain.preprocess import PlanePreprocessing
from pretrain.publish import load_backbone
from pretrain.redact import public, public_string
from shards.config import ConfigError, load_config, to_dict
from shards.manifest import sha256_of
from shards.dataset import DatasetDeclaration, dataset_of

from .heads.fusion import GatingNetwork, build_feature_model
from .heads.linear import PlaneHead
from .heads.probe import LogisticProbe
from .heads.segmentation import SegDecoder
from .heads.tuned import TunedBackbone
from .model_card import render_task_card
from .tasks import TaskConfig

FORMAT = "mskfm-task-model"
VERSION = 1
META, HEADS, CONFIG, METRICS, CARD = "task_model.json", "heads.safetensors", "task_config.yaml", "metrics.json", "README.md"
BACKBONE_WEIGHTS = "diffusion_pytorch_model.safetensors"
DEFAULT_THRESHOLD = 0.5
DEFAULT_CACHE = Path.home() / ".cache" / "mskfm" / "task_models"


class TaskModelError(ConfigError):
    """A task model that cannot be used as it is (missing, altered, or not matching the input)."""



def backbone_digest(folder: Path, where: str) -> dict[str, str]:
    """sha256 of a published backbone's weights file and of its config.json."""
    weights, config = Path(folder) / BACKBONE_WEIGHTS, Path(folder) / "config.json"
    for path in (weights, config):
        if not path.is_file():
            raise TaskModelError(f"backbone {where}: {path.name} is missing (a published backbone folder holds "
                                 f"{BACKBONE_WEIGHTS} and config.json)")
    return {"sha256": sha256_of(str(weights)), "config_sha256": sha256_of(str(config))}


def portable_config(task: TaskConfig) -> dict:
    """The resolved task config fit to share: absolute local paths become ``<local>/<name>`` and user
    names are removed (:mod:`pretrain.redact`); remote URLs and relative paths stay as given."""
    return public(to_dict(task))


def head_kind(task: TaskConfig) -> str:
    if task.kind == "segmentation":
        return "segmentation"
    if task.head.finetune_blocks:
        return "tuned"
    return "experts" if task.fusion.kind == "experts" and len(task.planes) > 1 else "features"


def build_head(task: TaskConfig, channels: dict[str, list[int]], grid: list[int] | None = None,
               backbones: dict[str, torch.nn.Module] | None = None) -> torch.nn.Module:
    """The same module ``run_finetune`` trains as the task's model, freshly initialised."""
    kind, n_labels = head_kind(task), len(task.labels)
    if task.head.kind == "logistic":
        return LogisticProbe({p: channels[p] for p in task.planes}, n_labels)
    if kind == "segmentation":
        plane = task.planes[0]
        return SegDecoder(plane, channels[plane], len(task.structures) + 1, grid, task.head.hidden)
    if kind == "experts":
        experts = {p: PlaneHead(p, channels[p], n_labels, task.head.kind, task.features.pooling, task.head.hidden,
                                task.head.dropout) for p in task.planes}
        return torch.nn.ModuleDict({"gate": GatingNetwork(len(task.planes), n_labels, task.fusion.hidden),
                                    "experts": torch.nn.ModuleDict(experts)})
    image = build_feature_model(task.fusion.kind, {p: channels[p] for p in task.planes}, n_labels, task.head,
                                task.features.pooling, task.fusion)
    if kind == "tuned":
        return TunedBackbone(backbones, image, task.features, list(task.head.finetune_blocks))
    return image


def save_task_model(run_dir: Path, task: TaskConfig, result: dict, planes: dict, manifest: dict, metrics: dict,
                    counts: dict, thresholds: dict[str, float] | None = None) -> Path:
    """Write ``<run_dir>/model/`` from the finetune run's task model (``result``: the ``diffusion``
    entry of the run's results), its per-plane inputs, the training manifest, the metrics and the
    decision thresholds chosen on the validation split (per label; NaN or absent = none chosen)."""
    out = Path(run_dir) / "model"
    tmp = Path(tempfile.mkdtemp(prefix=".model.", dir=run_dir))
    chosen, source = stored_thresholds(task.labels, thresholds)
    meta = {
        "format": FORMAT, "version": VERSION, "task": task.name, "kind": task.kind, "joint": task.joint,
        "planes": list(task.planes), "vocabulary": vocabulary(task, dataset_of(manifest)), "head": head_kind(task),
        "channels": {p: d.channels() for p, d in planes.items()},
        "preprocessing": {p: dict(d.spec) for p, d in planes.items()},
        "backbones": {p: {"url": public_string(d.backbone_url), "plane": p,
                          **backbone_digest(_backbone_folder(d.backbone_url), f"for plane {p} ({d.backbone_url})")}
                      for p, d in planes.items()},
        "thresholds": chosen, "threshold_source": source,
        "metrics_split": task.train.eval_split, "counts": counts,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    save_model(result["model"], str(tmp / HEADS), metadata={"format": FORMAT, "task": task.name})
    (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
    config = portable_config(task)
    (tmp / CONFIG).write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    (tmp / METRICS).write_text(json.dumps(public(metrics), indent=1, sort_keys=True, default=_plain))
    (tmp / CARD).write_text(render_task_card(meta, config, metrics, manifest))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def stored_thresholds(labels: list[str], thresholds: dict[str, float] | None) -> tuple[dict[str, float], str]:
    """Per label the threshold chosen on validation, else :data:`DEFAULT_THRESHOLD`; and a note saying which."""
    if not labels:
        return {}, "none (segmentation)"
    given = {k: float(v) for k, v in (thresholds or {}).items() if v is not None and math.isfinite(v)}
    out = {name: given.get(name, DEFAULT_THRESHOLD) for name in labels}
    missing = [name for name in labels if name not in given]
    if not missing:
        return out, "validation split (Youden point)"
    if len(missing) == len(labels):
        return out, f"default {DEFAULT_THRESHOLD}: this run chose no thresholds on a validation split"
    return out, (f"validation split (Youden point); default {DEFAULT_THRESHOLD} for {', '.join(missing)} "
                 "(one class only in validation)")


def vocabulary(task: TaskConfig, dataset: DatasetDeclaration) -> dict:
    """What the model outputs: its labels (outputs, ``<label>=<class>`` for multiclass ones) or its
    structures, and the label-map values of the training shards' structures (name -> value)."""
    if task.kind == "diagnosis":
        return {"labels": list(task.labels)}
    return {"structures": list(task.structures), "ignore_index": task.ignore_index,
            "source_structures": dataset.structure_values(task.joint)}


def _plain(obj):
    return obj.item() if hasattr(obj, "item") else str(obj)


def _backbone_folder(url: str) -> Path:
    from pretrain.hub import fetch_folder

    try:
        return fetch_folder(url)
    except FileNotFoundError as exc:
        raise TaskModelError(str(exc)) from None


# ----- loading ------------------------------------------------------------------------------------
@dataclass
class TaskModel:
    """A loaded task model: metadata, task config, head module and per-plane backbones (eval mode)."""

    meta: dict
    task: TaskConfig
    head: torch.nn.Module
    backbones: dict[str, torch.nn.Module]
    metrics: dict

    @property
    def planes(self) -> list[str]:
        return list(self.meta["planes"])

    @property
    def labels(self) -> list[str]:
        return list(self.meta["vocabulary"].get("labels", []))

    @property
    def structures(self) -> list[str]:
        return list(self.meta["vocabulary"].get("structures", []))

    def spec(self, plane: str) -> PlanePreprocessing:
        return PlanePreprocessing.from_dict(self.meta["preprocessing"][plane])


def fetch_task_model(url: str, cache_dir: str | Path | None = None) -> Path:
    """A local folder with the task model at ``url`` (a folder, a finetune run folder, s3://, hf://)."""
    url = str(url)
    if url.startswith(HF_PREFIX):
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(url[len(HF_PREFIX):], token=os.environ.get("HF_TOKEN"), cache_dir=cache_dir))
    if is_local(url):
        local = Path(url.removeprefix("file://"))
        if not (local / META).is_file() and (local / "model" / META).is_file():
            local = local / "model"  # a finetune run folder
        if not (local / META).is_file():
            raise TaskModelError(f"no task model at {url} ({META} missing; a finetune run writes one to <run>/model)")
        return local
    fs, root = fsspec.core.url_to_fs(url)
    if not fs.exists(posixpath.join(root, META)):
        raise TaskModelError(f"no task model at {url} ({META} missing)")
    local = Path(cache_dir or DEFAULT_CACHE) / hashlib.sha256(url.encode()).hexdigest()[:16]
    shutil.rmtree(local, ignore_errors=True)
    for remote in fs.find(root):
        target = local / posixpath.relpath(remote, root)
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(remote, str(target))
    return local


def resolve_backbone(plane: str, record: dict, overrides: dict[str, str], backbone_dir: str | None) -> str:
    """Where to load a plane's backbone: ``backbones.<plane>=URL``, else ``<backbone_dir>/<name>`` for a
    backbone recorded as a local folder, else the recorded URL."""
    if plane in overrides:
        return overrides[plane]
    if backbone_dir and is_local(record["url"]):
        return str(Path(backbone_dir) / Path(record["url"]).name)
    return record["url"]


def check_backbone(plane: str, record: dict, url: str) -> Path:
    """The backbone's local folder, after checking its sha256 against the task model's record."""
    where = f"for plane {plane} at '{url}'"
    if is_local(url) and not Path(url.removeprefix("file://")).is_dir():
        raise TaskModelError(f"backbone {where} is missing (recorded as '{record['url']}'); give "
                             f"backbone_dir=DIR or backbones.{plane}=URL")
    folder = _backbone_folder(url)
    found = backbone_digest(folder, where)
    for key, what in (("sha256", "weights"), ("config_sha256", "config.json")):
        if found[key] != record[key]:
            raise TaskModelError(f"backbone {where} was altered or is another one: its {what} sha256 is "
                                 f"{found[key]}, the task model expects {record[key]} (recorded URL "
                                 f"'{record['url']}'); refusing to use it")
    return folder


def load_task_model(url: str, backbones: dict[str, str] | None = None, backbone_dir: str | None = None,
                    device: str = "cpu", cache_dir: str | Path | None = None) -> TaskModel:
    """Load and check a task model and its backbones (sha256-verified), ready for :mod:`.predict`."""
    folder = fetch_task_model(url, cache_dir)
    try:
        meta = json.loads((folder / META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TaskModelError(f"{url}: {META} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise TaskModelError(f"{url}: {META} is not a version-{VERSION} {FORMAT} task model")
    task = load_config(TaskConfig, folder / CONFIG)
    loaded = {}
    for plane in meta["planes"]:
        record = meta["backbones"][plane]
        local = check_backbone(plane, record, resolve_backbone(plane, record, backbones or {}, backbone_dir))
        model, _, _ = load_backbone(str(local), device=device)
        loaded[plane] = model
    grid = meta["preprocessing"][task.planes[0]]["shape"]
    head = build_head(task, meta["channels"], grid, loaded)
    try:
        missing, unexpected = load_model(head, str(folder / HEADS), strict=False)
    except Exception as exc:  # a truncated or foreign file: safetensors raises several types
        raise TaskModelError(f"{url}: {HEADS} cannot be read ({type(exc).__name__}: {exc})") from None
    if missing or unexpected:
        raise TaskModelError(f"{url}: {HEADS} does not fit the task's head (missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]})")
    metrics = json.loads((folder / METRICS).read_text()) if (folder / METRICS).is_file() else {}
    return TaskModel(meta, task, head.to(device).eval(), loaded, metrics)


def export_task_model(run: str, dest: str, overwrite: bool = False) -> str:
    """Copy a run's task model (or a task model folder) to a folder, ``s3://...`` or ``hf://owner/repo``.

    ``hf://`` uploads with huggingface_hub's ``HfApi.upload_folder`` (needs ``HF_TOKEN``)."""
    folder = fetch_task_model(run)
    try:
        put_folder(folder, str(dest), overwrite)
    except FileExistsError:
        raise TaskModelError(f"a task model already exists at {dest}; export under a new name or pass "
                             f"--overwrite") from None
    except RuntimeError as exc:  # hf:// without a token
        raise TaskModelError(str(exc)) from None
    return str(dest)
