"""Publishing reconstruction backbones the same way as the diffusion ones (same folder layout and
hubs: local folder, ``s3://``, ``hf://``), minus the noise scheduler they do not have::

    config.json, diffusion_pytorch_model.safetensors   (diffusers save_pretrained)
    training_config.yaml, metrics.json, README.md       (model card for a reconstruction network)

Like the diffusion backbones, nothing published names a local path or a user (:mod:`pretrain.redact`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from ..hub import fetch_folder, put_folder
from ..publish import public_inputs
from ..models.recon import RECON_BACKBONES
from ..models.recon_seg import RECON_SEG_BACKBONES


def render_recon_card(model, manifest: dict, metrics: dict, train_config: dict | None) -> str:
    cfg = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    stats = (manifest or {}).get("stats", {})
    n_params = sum(p.numel() for p in model.parameters())
    recon = ((train_config or {}).get("model") or {}).get("recon", {})
    return "\n".join([
        "---", "library_name: diffusers", "license: apache-2.0",
        "tags: [mskfm, mri, musculoskeletal, reconstruction, varnet, k-space]", "---", "",
        f"# mskfm reconstruction backbone — `{type(model).__name__}`", "",
        (f"A physics-based MRI reconstruction network ({n_params:,} parameters) trained on multi-coil "
         "k-space slices with retrospective undersampling and fastMRI's SSIM loss." if cfg.get("task") == "reconstruction"
         else f"An MRI {cfg.get('task')} network ({n_params:,} parameters) trained on multi-coil k-space slices with "
         f"retrospective undersampling (objective `{(train_config or {}).get('objective', '?')}`; weights under "
         "`model.multitask` below)."), "",
        *([f"- Structures: {', '.join(cfg['structures'])}"] if cfg.get("structures") else []),
        "## Training", "",
        f"- Steps: {metrics.get('steps', 'n/a')}; final loss: {metrics.get('final_loss', 'n/a')}",
        f"- Architecture: `{json.dumps(cfg, sort_keys=True)}`",
        f"- Undersampling / coil handling: `{json.dumps(recon, sort_keys=True, default=str)}`",
        *([f"- Multitask: `{json.dumps(mt, sort_keys=True, default=str)}`"]
          if (mt := ((train_config or {}).get("model") or {}).get("multitask")) else []),
        "", "## Data", "",
        f"- Recon shard manifest kind `{(manifest or {}).get('kind', '?')}`, "
        f"{stats.get('n_samples', 'n/a')} slices",
        "", "## How to load", "", "```python",
        "from pretrain.recon.publish import load_recon_backbone",
        "model = load_recon_backbone('<this folder or URL>')",
        "image = model(masked_kspace, mask, num_low_frequencies)  # (B, rows, cols)",
        "feats = model.features(masked_kspace, mask, num_low_frequencies)",
        "```", "", f"Feature blocks: {', '.join(f'`{b}`' for b in model.block_names()[:12])}"
        + (" ..." if len(model.block_names()) > 12 else "") + ".", "",
        "## Intended use and limits", "",
        "- Research use only; not a medical device.",
        "- Trained on synthetic k-space when the data above came from `shards.synth`: use it to test "
        "pipelines, not to report clinical image quality.",
        "- Undersampling patterns, accelerations and coil counts outside those above are out of distribution.", ""])


def publish_recon_backbone(model, out_url: str, train_config: dict, manifest: dict, metrics: dict,
                           overwrite: bool = False, storage_options: dict | None = None) -> str:
    """Write a published reconstruction backbone folder at ``out_url``; returns the URL."""
    out_url = str(out_url)
    train_config, manifest, metrics = public_inputs(train_config, manifest, metrics)
    with tempfile.TemporaryDirectory(prefix="mskfm-publish-") as tmp:
        staged = Path(tmp) / "backbone"
        model.save_pretrained(staged, safe_serialization=True)
        (staged / "training_config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(train_config or {})))
        (staged / "metrics.json").write_text(json.dumps(metrics or {}, indent=1, sort_keys=True, default=str))
        (staged / "README.md").write_text(render_recon_card(model, manifest, metrics or {}, train_config))
        put_folder(staged, out_url, overwrite, storage_options)
    return out_url


def load_recon_backbone(url: str, cache_dir: str | Path | None = None, storage_options: dict | None = None,
                        device: str = "cpu"):
    """A published reconstruction backbone (eval mode), from a folder or URL."""
    folder = fetch_folder(str(url), cache_dir, storage_options)
    class_name = json.loads((folder / "config.json").read_text()).get("_class_name")
    classes = {cls.__name__: cls for cls in (*RECON_BACKBONES.values(), *RECON_SEG_BACKBONES.values())}
    if class_name not in classes:
        raise ValueError(f"{url}: '{class_name}' is not a reconstruction backbone; known: {', '.join(sorted(classes))}")
    return classes[class_name].from_pretrained(folder, low_cpu_mem_usage=False).to(device).eval()
