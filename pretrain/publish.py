"""Publishing a trained backbone to a hub, and loading it back with only torch + diffusers.

A hub is a local folder (default), an ``s3://`` (or other fsspec) URL, or ``hf://<owner>/<repo>``
(a Hugging Face model repo; needs ``HF_TOKEN``). A published folder holds::

    config.json                          backbone config (architecture, plane, preprocessing, schedule)
    diffusion_pytorch_model.safetensors  weights (diffusers save_pretrained)
    scheduler/scheduler_config.json      the diffusers noise scheduler
    training_config.yaml                 the resolved training config
    metrics.json                         final training metrics
    README.md                            model card

For s3, endpoint and credentials come from the usual AWS environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...), which s3fs/botocore read; ``storage_options`` passes extra fsspec options.
This module imports neither DeepSpeed nor Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import tempfile
from pathlib import Path

import fsspec
from diffusers import DDPMScheduler
from omegaconf import OmegaConf

from .model_card import render_model_card
from .models import BACKBONES, DiffusionBackbone

HF_PREFIX = "hf://"
SCHEDULER_DIR = "scheduler"


def _stage(model, scheduler, folder: Path, train_config: dict, manifest: dict, metrics: dict) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    scheduler.save_pretrained(folder / SCHEDULER_DIR)
    (folder / "training_config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(train_config or {})))
    (folder / "metrics.json").write_text(json.dumps(metrics or {}, indent=1, sort_keys=True))
    (folder / "README.md").write_text(render_model_card(model, scheduler, manifest, metrics, train_config))


def publish_backbone(model, scheduler, out_url: str, train_config: dict, manifest: dict, metrics: dict,
                     overwrite: bool = False, storage_options: dict | None = None) -> str:
    """Write a published backbone folder at ``out_url`` and return that URL.

    model: a ``DiffusionBackbone`` with the final (preferably EMA) full weights, on any device.
    scheduler: the diffusers scheduler it was trained with. train_config: the resolved training config
    as a plain dict. manifest: the shard manifest the model was trained on (data summary for the card).
    metrics: final metrics; ``steps`` and ``final_loss`` are shown in the card, all keys are kept.
    out_url: a local folder, ``s3://bucket/prefix/<name>`` or ``hf://<owner>/<repo>``. An existing
    non-empty destination is refused (``FileExistsError`` naming it) unless ``overwrite=True``.
    """
    out_url = str(out_url)
    with tempfile.TemporaryDirectory(prefix="mskfm-publish-") as tmp:
        staged = Path(tmp) / "backbone"
        _stage(model, scheduler, staged, train_config, manifest, metrics)
        if out_url.startswith(HF_PREFIX):
            _push_hf(staged, out_url[len(HF_PREFIX):], overwrite)
        elif "://" not in out_url or out_url.startswith("file://"):
            _put_local(staged, Path(out_url.removeprefix("file://")), overwrite)
        else:
            _put_fsspec(staged, out_url, overwrite, storage_options or {})
    return out_url


def _refuse(url: str) -> None:
    raise FileExistsError(f"a published backbone already exists at {url}; "
                          "publish under a new name/version or pass overwrite=True (--overwrite)")


def _put_local(staged: Path, dest: Path, overwrite: bool) -> None:
    if dest.exists() and any(dest.iterdir()):
        if not overwrite:
            _refuse(str(dest))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    shutil.copytree(staged, tmp, dirs_exist_ok=True)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


def _put_fsspec(staged: Path, url: str, overwrite: bool, storage_options: dict) -> None:
    fs, root = fsspec.core.url_to_fs(url, **storage_options)
    if fs.exists(root) and fs.find(root):
        if not overwrite:
            _refuse(url)
        fs.rm(root, recursive=True)
    for path in sorted(p for p in staged.rglob("*") if p.is_file()):
        fs.put_file(str(path), posixpath.join(root, path.relative_to(staged).as_posix()))


def _hf_api():
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise RuntimeError("publishing to or loading a private hf:// repo needs a Hugging Face token: "
                           "set HF_TOKEN (or publish to a local folder or s3:// URL)")
    from huggingface_hub import HfApi

    return HfApi(token=token)


def _push_hf(staged: Path, repo_id: str, overwrite: bool) -> None:
    api = _hf_api()
    api.create_repo(repo_id, repo_type="model", exist_ok=True)
    if api.file_exists(repo_id, "config.json") and not overwrite:
        _refuse(HF_PREFIX + repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=str(staged), commit_message="mskfm: publish backbone")


def _fetch(url: str, cache_dir: str | Path | None, storage_options: dict) -> Path:
    """A local folder holding the published files of ``url`` (downloaded for remote URLs)."""
    if url.startswith(HF_PREFIX):
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(url[len(HF_PREFIX):], token=os.environ.get("HF_TOKEN"),
                                      cache_dir=cache_dir))
    if "://" not in url or url.startswith("file://"):
        local = Path(url.removeprefix("file://"))
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"no published backbone at {local} (config.json missing)")
        return local
    fs, root = fsspec.core.url_to_fs(url, **storage_options)
    if not fs.exists(posixpath.join(root, "config.json")):
        raise FileNotFoundError(f"no published backbone at {url} (config.json missing)")
    base = Path(cache_dir or Path.home() / ".cache" / "mskfm" / "backbones")
    local = base / hashlib.sha256(url.encode()).hexdigest()[:16]
    if local.exists():
        shutil.rmtree(local)  # re-fetch: a version may have been republished with overwrite
    for remote in fs.find(root):
        target = local / posixpath.relpath(remote, root)
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(remote, str(target))
    return local


def load_backbone(url: str, cache_dir: str | Path | None = None, storage_options: dict | None = None,
                  device: str = "cpu"):
    """Load a published backbone: returns ``(model, scheduler, preprocessing)``, model in eval mode.

    ``preprocessing`` is the stored :class:`~pretrain.preprocess.PlanePreprocessing` (or None).
    Remote folders are downloaded into ``cache_dir`` (default ``~/.cache/mskfm/backbones``).
    """
    folder = _fetch(str(url), cache_dir, storage_options or {})
    with open(folder / "config.json") as f:
        class_name = json.load(f).get("_class_name", DiffusionBackbone.__name__)
    classes = {cls.__name__: cls for cls in BACKBONES.values()}
    if class_name not in classes:
        raise ValueError(f"{url}: backbone class '{class_name}' is unknown; known: {', '.join(sorted(classes))}")
    model = classes[class_name].from_pretrained(folder, low_cpu_mem_usage=False).to(device).eval()
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder=SCHEDULER_DIR)
    return model, scheduler, getattr(model, "preprocessing", None)
