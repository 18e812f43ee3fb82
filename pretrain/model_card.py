"""The model card (``README.md``) of a published backbone, rendered from its config, the shard
manifest's data summary and the final training metrics."""

from __future__ import annotations

import json

SYNTHETIC_SOURCES = ("synth", "synthetic")


def _counts(d: dict | None) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted((d or {}).items())) or "n/a"


def _data_summary(manifest: dict) -> list[str]:
    stats = manifest.get("stats", {})
    lines = [f"- Shard manifest `{manifest.get('name', '?')}`: schema v{manifest.get('schema_version', '?')}, kind "
             f"`{manifest.get('kind', '?')}`, created {manifest.get('created', '?')}",
             f"- Source: {manifest.get('source') or manifest.get('sources') or 'n/a'}",
             f"- Studies: {stats.get('n_samples', 'n/a')}"]
    for split, s in sorted(manifest.get("splits", {}).items()):
        lines.append(f"  - {split}: {s.get('n_samples', '?')} studies, {len(s.get('patients', []))} patients, "
                     f"{s.get('n_shards', '?')} shards")
    lines += [f"- Joints: {_counts(stats.get('joint'))}",
              f"- Sites: {_counts(stats.get('site'))}",
              f"- Field strength (T): {_counts(stats.get('field_strength'))}",
              f"- Vendors: {_counts(stats.get('vendor'))}",
              "", "| plane | volumes | common shape (S, R, C) | mean spacing (mm) | intensity p0.5 / p99.5 |",
              "|---|---|---|---|---|"]
    for plane, ps in sorted(stats.get("planes", {}).items()):
        inten = ps.get("intensity", {})
        lines.append(f"| {plane} | {ps.get('n', '?')} | {'x'.join(map(str, ps.get('common_shape', [])))} | "
                     f"{', '.join(map(str, ps.get('spacing_mean', [])))} | "
                     f"{inten.get('p0.5', '?')} / {inten.get('p99.5', '?')} |")
    return lines


def render_model_card(model, scheduler, manifest: dict, metrics: dict, train_config: dict | None = None) -> str:
    """Markdown with a Hugging Face front matter: what the backbone is, its data, training and limits."""
    cfg = dict(model.config)
    plane = cfg.get("plane", "?")
    metrics = metrics or {}
    n_params = sum(p.numel() for p in model.parameters())
    sched = scheduler.config
    pre = json.dumps(cfg.get("preprocessing"), indent=1, sort_keys=True)
    lines = [
        "---", "library_name: diffusers", "license: apache-2.0",
        "tags: [mskfm, mri, musculoskeletal, diffusion, self-supervised, 3d]", "---", "",
        f"# mskfm 3D diffusion backbone — plane `{plane}`", "",
        f"A self-supervised 3D U-Net noise predictor (MONAI `DiffusionModelUNet`, {n_params:,} parameters) "
        f"trained with the DDPM objective on unlabeled `{plane}` MRI volumes. Its intermediate feature maps "
        "(`DiffusionBackbone.features`) are meant as representations for downstream MSK tasks.", "",
        "## Training", "",
        f"- Plane: `{plane}`",
        f"- Steps: {metrics.get('steps', 'n/a')}",
        f"- Final loss: {metrics.get('final_loss', 'n/a')}",
        f"- Noise schedule: diffusers `{type(scheduler).__name__}`, {sched.num_train_timesteps} steps, "
        f"beta schedule `{sched.beta_schedule}`, prediction type `{sched.prediction_type}`",
        f"- Architecture: channels {list(cfg.get('channels', []))}, attention levels "
        f"{list(cfg.get('attention_levels', []))}, res blocks {cfg.get('num_res_blocks')}",
    ]
    extra = {k: v for k, v in metrics.items() if k not in ("steps", "final_loss")}
    if extra:
        lines.append(f"- Other metrics: {json.dumps(extra, sort_keys=True)}")
    if train_config:
        lines.append("- Full resolved training config: `training_config.yaml`")
    lines += ["", "## Data", ""]
    if str((manifest or {}).get("source", "")).lower() in SYNTHETIC_SOURCES:
        lines += ["**Trained on synthetic studies (`shards.synth` phantoms), not patient data.**", ""]
    lines += [*_data_summary(manifest or {}), "",
              "## Preprocessing", "",
              "Applied by `pretrain.preprocess.preprocess_volume(volume, model.preprocessing)`; stored in "
              "`config.json` so downstream code reuses it exactly:", "", "```json", pre, "```", "",
              "## How to load", "", "```python",
              "from pretrain.publish import load_backbone",
              "model, scheduler, spec = load_backbone('<this folder or URL>')",
              "x = preprocess_volume(volume, spec)[None]  # (1, 1, S, R, C)",
              f"feats = model.features(x, timesteps=[100], blocks={model.block_names()[-2:]!r})",
              "```", "", f"Block names: {', '.join(f'`{b}`' for b in model.block_names())}.", "",
              "## Intended use and limits", "",
              "- Research use only. Not a medical device; not validated for clinical decisions.",
              "- Weights trained on synthetic shards (source `synth`) learned procedural phantoms, not patient "
              "anatomy: use them to test pipelines, not to report clinical performance.",
              f"- Trained for one plane (`{plane}`) and the preprocessing above; other planes, grids or "
              "intensity windows are out of distribution.",
              "- Dataset biases (joints, sites, vendors, field strengths listed above) carry into the features.",
              ""]
    return "\n".join(lines)
