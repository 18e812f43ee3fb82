"""Importing published foundation-model checkpoints as standard mskfm backbone folders.

    import_checkpoint("model.pt" | "hf://owner/repo/path/model.pt", "orthodiffusion", "sag", "<folder>")

A format (:data:`FORMATS`) names the mskfm backbone class whose parameter names match the upstream
checkpoint, the upstream architecture and preprocessing (the class defaults; ``key=value`` overrides
for checkpoints trained at another size), how upstream keys map to the class's, and the source's
licence and citation for the model card. The checkpoint is read as tensors only
(``torch.load(weights_only=True)`` or safetensors); a file that needs unpickling of code is refused.
EMA weights are taken where the checkpoint has them. Every check (keys, shapes, finite values, noise
schedule) runs before anything is written; the folder is then staged and moved into place whole, with
``config.json``, safetensors weights, ``scheduler/``, ``import.json`` (provenance) and a model card.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from shards.config import ConfigError, UserError, lookup
from shards.manifest import sha256_of

from .hub import HF_PREFIX, is_local, put_folder, refuse_existing
from .models.orthodiffusion import ORTHODIFFUSION_PREPROCESSING, ORTHODIFFUSION_SCHEDULE, OrthoDiffusionBackbone
from .preprocess import PlanePreprocessing
from .publish import SCHEDULER_DIR
from .schedule import ScheduleConfig


class CheckpointImportError(UserError, ValueError):
    """A checkpoint that cannot be imported: the message names the file and the key or reason."""


@dataclass(frozen=True)
class ImportFormat:
    name: str
    backbone: type
    defaults: dict                      # backbone config besides plane/preprocessing/schedule
    preprocessing: dict
    schedule: dict
    prefixes: tuple[str, ...]           # upstream key prefixes stripped to get the backbone's names
    ignored: tuple[str, ...]            # upstream keys that are not network weights
    schedule_key: str | None            # upstream key holding the training betas (checked)
    source: str
    licence_id: str                     # the model card's front-matter licence
    licence: str
    citation: str
    notes: list[str] = field(default_factory=list)


ORTHODIFFUSION = ImportFormat(
    name="orthodiffusion",
    backbone=OrthoDiffusionBackbone,
    defaults={"in_channels": 1, "out_channels": 1, "model_channels": 64, "channel_mult": [1, 1, 2, 2, 4],
              "num_res_blocks": 1, "attention_levels": [False, False, False, False, True], "num_heads": 1,
              "norm_num_groups": 32, "dropout": 0.0, "time_embed_max_period": 1000.0,
              "activation_checkpointing": False},
    preprocessing=ORTHODIFFUSION_PREPROCESSING,
    schedule=ORTHODIFFUSION_SCHEDULE,
    prefixes=("denoise_fn.module.", "denoise_fn.", "module."),
    ignored=("alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
             "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
             "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1",
             "posterior_mean_coef2", "posterior_mean_coef3"),
    schedule_key="betas",
    source="OrthoDiffusion — code https://github.com/lt-0123/OrthoDiffusion, weights "
           "https://huggingface.co/lanstat0123/orthodiffusion",
    licence_id="mit",
    licence="MIT (OrthoDiffusion's code repository, Copyright (c) 2026 Lan Tian); check the weights' Hub "
            "page for any further terms",
    citation="""@misc{orthodiffusion2026,
  title={OrthoDiffusion: A Generalizable Multi-Task Diffusion Foundation Model for Musculoskeletal MRI Interpretation},
  author={Tian Lan and Lei Xu and Zimu Yuan and Shanggui Liu and Jiajun Liu and Jiaxin Liu and Weilai Xiang and Hongyu Yang and Dong Jiang and Jianxin Yin and Dingyu Wang},
  year={2026}, eprint={2602.20752}, archivePrefix={arXiv}, primaryClass={cs.CV},
  url={https://arxiv.org/abs/2602.20752}
}""",
    notes=["Pretrained by its authors, self-supervised (DDPM, cosine schedule, 1000 steps, EMA 0.995), on "
           "15,948 unlabeled knee MRI scans (paper), one model per plane.",
           "Their preprocessing, stored in `config.json` and applied by mskfm: the 16 central slices, "
           "bilinear 256x256 in-plane, then each volume's min-max to [-1, 1]. Volumes with fewer than 16 "
           "slices (which OrthoDiffusion skips) are zero-padded centrally.",
           "In-plane orientation is mskfm's (slices, rows, cols) as ingested; OrthoDiffusion read NIfTI "
           "arrays as (rows, cols, slices). Features of other orientations or joints are out of distribution."],
)

FORMATS = {"orthodiffusion": ORTHODIFFUSION}


# ----- reading ---------------------------------------------------------------------------------
def fetch_checkpoint(source: str, cache_dir: str | Path | None = None) -> Path:
    """A local path for ``source``: a file, or ``hf://owner/repo/path/in/repo`` (downloaded)."""
    if source.startswith(HF_PREFIX):
        parts = source[len(HF_PREFIX):].split("/")
        if len(parts) < 3 or not all(parts):
            raise CheckpointImportError(f"{source}: a Hub checkpoint is hf://<owner>/<repo>/<file in the repo>")
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

        try:
            return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]), token=os.environ.get("HF_TOKEN"),
                                        cache_dir=cache_dir))
        except (EntryNotFoundError, HfHubHTTPError) as exc:  # also offline (LocalEntryNotFoundError)
            raise CheckpointImportError(f"{source}: cannot download ({str(exc).splitlines()[0]})") from None
    path = Path(source.removeprefix("file://"))
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {source}")
    return path



def load_tensors(path: Path):
    """The checkpoint's content, tensors and plain containers only: never arbitrary unpickling."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as exc:
            raise CheckpointImportError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        reason = f"it references {found.group(1)}" if found else str(exc).splitlines()[0]
        raise CheckpointImportError(f"{path}: refused, the file needs unpickling of code, not only tensors "
                                    f"({reason}); only weights_only checkpoints are read") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointImportError(f"{path}: not a readable PyTorch checkpoint ({str(exc).splitlines()[0]})") from None


def pick_weights(obj, path: Path) -> tuple[dict, str]:
    """``(state dict, which)``: the EMA weights where present, else the raw model, else a flat state dict."""
    if not isinstance(obj, dict):
        raise CheckpointImportError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    for key in ("ema", "model"):
        if isinstance(obj.get(key), dict):
            return obj[key], key
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, "state_dict"
    raise CheckpointImportError(f"{path}: no 'ema' or 'model' state dict and not a flat state dict; "
                                f"top-level keys: {', '.join(map(str, list(obj)[:10]))}")


def _few(keys: Sequence[str]) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")


def match_state_dict(fmt: ImportFormat, state: dict, model: torch.nn.Module, path: Path) -> tuple[dict, dict]:
    """``(weights for model, non-weight tensors kept for checks)``; raises naming the first bad keys."""
    weights, extra = {}, {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointImportError(f"{path}: key '{key}' holds a {type(value).__name__}, not a tensor")
        name = next((key[len(p):] for p in fmt.prefixes if key.startswith(p)), key)
        if name in fmt.ignored or name == fmt.schedule_key:
            extra[name] = value
        else:
            weights[name] = value
    expected = model.state_dict()
    missing, unexpected = set(expected) - set(weights), set(weights) - set(expected)
    if missing and len(missing) == len(expected):
        raise CheckpointImportError(f"{path}: not a checkpoint of format '{fmt.name}': none of its {len(weights)} weight keys "
                                    f"is a {fmt.backbone.__name__} parameter (e.g. {_few(unexpected)})")
    hint = "(trained at another size? give its architecture as key=value overrides)"
    if missing:
        raise CheckpointImportError(f"{path}: missing key(s) {_few(missing)} {hint}")
    if unexpected:
        raise CheckpointImportError(f"{path}: unexpected key(s) {_few(unexpected)} {hint}")
    for name, value in weights.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise CheckpointImportError(f"{path}: shape mismatch at key '{name}': checkpoint "
                                        f"{tuple(value.shape)}, {fmt.name} backbone {tuple(expected[name].shape)}")
        if not value.is_floating_point():
            raise CheckpointImportError(f"{path}: key '{name}' has dtype {value.dtype}, not floating point")
        if not torch.isfinite(value).all():
            raise CheckpointImportError(f"{path}: key '{name}' holds NaN or infinite values")
    return {k: v.float() for k, v in weights.items()}, extra


def check_schedule(fmt: ImportFormat, extra: dict, model, path: Path) -> None:
    """The betas the checkpoint was trained with must be the schedule stored with the backbone."""
    betas = extra.get(fmt.schedule_key) if fmt.schedule_key else None
    if betas is None:
        return
    ours = model.make_scheduler().betas.double()
    if betas.shape != ours.shape or not np.allclose(betas.double().numpy(), ours.numpy(), rtol=1e-4, atol=1e-6):
        cfg = model.config.schedule
        raise CheckpointImportError(f"{path}: key '{fmt.schedule_key}' ({betas.numel()} steps) is not the noise "
                                    f"schedule {cfg['beta_schedule']} with {cfg['num_train_timesteps']} steps; set "
                                    f"schedule.* overrides to the one it was trained with")


# ----- building ----------------------------------------------------------------------------------
def backbone_config(fmt: ImportFormat, plane: str, overrides: Sequence[str] = ()) -> dict:
    """The format's published config for ``plane`` with ``key=value`` overrides (unknown key = error)."""
    base = OmegaConf.create({**fmt.defaults, "plane": plane,
                             "preprocessing": PlanePreprocessing(plane=plane, **fmt.preprocessing).to_dict(),
                             "schedule": ScheduleConfig(**fmt.schedule).to_dict()})
    OmegaConf.set_struct(base, True)
    try:
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
        raise ConfigError(f"key '{key}': {str(exc).splitlines()[0]}; known: {', '.join(base)}") from None
    cfg = OmegaConf.to_container(merged)
    if cfg["preprocessing"]["plane"] != plane:
        raise ConfigError(f"key 'preprocessing.plane': '{cfg['preprocessing']['plane']}' differs from --plane {plane}")
    return cfg


def render_import_card(fmt: ImportFormat, model, provenance: dict) -> str:
    """Model card of an imported backbone: source, licence, citation, provenance, use and limits."""
    cfg = dict(model.config)
    blocks = model.block_names()
    return "\n".join([
        "---", "library_name: diffusers", f"license: {fmt.licence_id}",
        "tags: [mskfm, mri, musculoskeletal, diffusion, self-supervised, 3d, imported]", "---", "",
        f"# {fmt.name} backbone imported into mskfm — plane `{cfg['plane']}`", "",
        f"Weights of a published model, converted unchanged (parameter names and values) into "
        f"`{type(model).__name__}` ({provenance['parameters']:,} parameters). Not trained by mskfm.", "",
        "## Source", "",
        f"- Model: {fmt.source}",
        f"- Imported file: `{provenance['source']}`",
        f"- sha256 of the imported file: `{provenance['sha256']}` ({provenance['bytes']:,} bytes)",
        f"- Weights taken: `{provenance['weights']}`" + (" (EMA)" if provenance["weights"] == "ema" else
                                                         " (no EMA weights in the file)"),
        f"- Training step recorded in the file: {provenance.get('step', 'n/a')}",
        f"- Licence: {fmt.licence}", "",
        *(f"- {note}" for note in fmt.notes), "",
        "## Citation", "", "```bibtex", fmt.citation, "```", "",
        "## Configuration", "", "```json",
        json.dumps({k: cfg[k] for k in (*fmt.defaults, "plane", "preprocessing", "schedule")}, indent=1), "```", "",
        "## How to load", "", "```python",
        "from pretrain.publish import load_backbone",
        "from pretrain.preprocess import preprocess_volume",
        "model, scheduler, spec = load_backbone('<this folder or URL>')",
        "x = preprocess_volume(volume, spec)[None]  # (1, 1, S, R, C)",
        "feats = model.features(x, timesteps=[100], blocks=['mid_2'])",
        "```", "", f"Block names (OrthoDiffusion's `get_feature` names): {', '.join(f'`{b}`' for b in blocks)}.", "",
        "## Intended use and limits", "",
        "- Research use only. Not a medical device; not validated for clinical decisions.",
        f"- One plane (`{cfg['plane']}`) and the preprocessing above; other planes, joints, grids or intensity "
        "scalings are out of distribution. The pretraining data's biases carry into the features.", ""])


def import_checkpoint(source: str, format: str, plane: str, to: str, overrides: Sequence[str] = (),
                      overwrite: bool = False, cache_dir: str | Path | None = None,
                      storage_options: dict | None = None) -> str:
    """Import ``source`` (a file or ``hf://owner/repo/file``) as a backbone folder at ``to``; returns ``to``.

    ``overrides``: ``key=value`` items changing the format's published config (architecture,
    ``preprocessing.*``, ``schedule.*``) for checkpoints trained otherwise. Raises
    :class:`CheckpointImportError` (file, key or reason) or ``ConfigError`` before writing anything.
    """
    fmt = lookup(FORMATS, format, "import format")
    cfg = backbone_config(fmt, plane, overrides)
    local = Path(str(to).removeprefix("file://"))
    if is_local(str(to)) and local.is_dir() and any(local.iterdir()) and not overwrite:
        refuse_existing(str(to))                              # before reading a large checkpoint
    path = fetch_checkpoint(source, cache_dir)
    obj = load_tensors(path)
    state, which = pick_weights(obj, path)
    try:
        with torch.device("meta"):
            skeleton = fmt.backbone(**cfg)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{fmt.name} backbone config: {exc}") from None
    weights, extra = match_state_dict(fmt, state, skeleton, path)
    check_schedule(fmt, extra, skeleton, path)
    model = fmt.backbone(**cfg)
    model.load_state_dict(weights, strict=True)
    step = obj.get("step") if isinstance(obj, dict) else None
    provenance = {"format": fmt.name, "source": source, "sha256": sha256_of(str(path)), "bytes": path.stat().st_size,
                  "weights": which, "parameters": sum(p.numel() for p in model.parameters()),
                  **({"step": int(step)} if isinstance(step, int) else {})}
    with tempfile.TemporaryDirectory(prefix="mskfm-import-") as tmp:
        staged = Path(tmp) / "backbone"
        model.save_pretrained(staged, safe_serialization=True)
        model.make_scheduler().save_pretrained(staged / SCHEDULER_DIR)
        (staged / "import.json").write_text(json.dumps(provenance, indent=1, sort_keys=True))
        (staged / "README.md").write_text(render_import_card(fmt, model, provenance))
        put_folder(staged, str(to), overwrite, storage_options)
    return str(to)
