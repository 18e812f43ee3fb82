"""The model card (``README.md``) of a task model: Hugging Face YAML header (huggingface_hub's
``ModelCardData``), intended use, data summary, metrics with intervals next to the baselines,
limitations. No local paths: backbones appear by their portable URL."""

from __future__ import annotations

import math

from huggingface_hub import ModelCardData

PIPELINE_TAG = {"diagnosis": "image-classification", "segmentation": "image-segmentation"}
HEADS = {"features": "a head on their frozen features", "experts": "per-label plane experts on their frozen "
         "features with a gating network", "tuned": "a head with fine-tuned backbone blocks",
         "segmentation": "a segmentation decoder on their frozen features"}


def _intensity(spec: dict) -> str:
    """The intensity step of a preprocessing spec, in words (per-volume modes have no window)."""
    if spec["intensity"] == "minmax":
        return f"each volume's min-max -> [{spec['out_min']}, {spec['out_max']}]"
    if spec["intensity"] == "volume":
        return f"each volume clipped at its p{spec['p_low']:g}/p{spec['p_high']:g} and z-scored"
    return f"intensity window [{spec['low']:.4g}, {spec['high']:.4g}] -> [{spec['out_min']}, {spec['out_max']}]"


def with_ci(value: float, ci) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    if not ci or not all(c is not None and math.isfinite(c) for c in ci):
        return f"{value:.3f}"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _counts(d: dict | None) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted((d or {}).items(), key=str)) or "n/a"


def diagnosis_rows(metrics: dict, at_thresholds: bool) -> list[str]:
    """AUROC and AP per model and label; with ``at_thresholds`` also sensitivity and specificity (at
    each model's thresholds chosen on validation)."""
    extra = " sens [95% CI] | spec [95% CI] |" if at_thresholds else ""
    rows = [f"| model | label | AUROC [95% CI] | AP [95% CI] |{extra}", "|---|---|---|---|" + "---|" * (2 * at_thresholds)]
    for model, m in metrics.items():
        for name, v in [*m.get("per_label", {}).items(), ("macro", m.get("macro", {}))]:
            ci = v.get("ci", {})
            cells = [with_ci(v.get(k), ci.get(k)) for k in ("auroc", "ap")]
            if at_thresholds:
                cells += [with_ci(v.get(k), ci.get(k)) for k in ("sensitivity", "specificity")]
            rows.append(f"| {model} | {name} | " + " | ".join(cells) + " |")
    return rows


def multiclass_rows(metrics: dict) -> list[str]:
    """Per model and multiclass/ordinal label: macro one-vs-rest AUROC and the study-level confusion matrix."""
    rows = []
    for model, m in metrics.items():
        for label, mc in m.get("multiclass", {}).items():
            rows += ["", f"{model}, `{label}`: macro one-vs-rest AUROC {with_ci(mc['macro_auroc'], None)}; "
                     f"confusion matrix over {mc['n']} test studies (rows true, columns predicted):", "",
                     "| true \\ predicted | " + " | ".join(mc["classes"]) + " |", "|---" * (len(mc["classes"]) + 1) + "|"]
            rows += [f"| {c} | " + " | ".join(map(str, row)) + " |" for c, row in zip(mc["classes"], mc["confusion"])]
    return rows


def segmentation_rows(metrics: dict) -> list[str]:
    rows = ["| model | structure | Dice [95% CI] | HD95 mm [95% CI] |", "|---|---|---|---|"]
    for model, m in metrics.items():
        for name, v in [*m.get("per_structure", {}).items(), ("mean", m.get("mean", {}))]:
            d, h = v.get("dice", {}), v.get("hd95", {})
            rows.append(f"| {model} | {name} | {with_ci(d.get('mean'), d.get('ci'))} | {with_ci(h.get('mean'), h.get('ci'))} |")
    return rows


def render_task_card(meta: dict, config: dict, metrics: dict, manifest: dict) -> str:
    kind, joint, planes = meta["kind"], meta["joint"], meta["planes"]
    bases = sorted({b["url"] for b in meta["backbones"].values()})
    header = ModelCardData(license="apache-2.0", library_name="mskfm", pipeline_tag=PIPELINE_TAG[kind],
                           base_model=bases, tags=["mskfm", "mri", "musculoskeletal", joint, kind, "medical-imaging",
                                                   "not-for-clinical-use"])
    vocab = meta["vocabulary"]
    what = (f"labels {', '.join(vocab['labels'])}" if kind == "diagnosis"
            else f"structures {', '.join(vocab['structures'])}")
    stats = manifest.get("stats", {})
    synthetic = str(manifest.get("source", "")).lower() in ("synth", "synthetic")
    counts = meta["counts"]
    lines = ["---", header.to_yaml(), "---", "",
             f"# mskfm task model `{meta['task']}` — {kind}, {joint}, planes {'+'.join(planes)}", "",
             "**Not for clinical use.** A research model: it has not been validated for diagnosis or treatment "
             "decisions and must not be used for them.", "",
             "## Intended use", "",
             f"Research on {joint} MRI: {what}, from the {', '.join(planes)} plane(s) of one study, with frozen "
             f"3D diffusion backbones (one per plane) and {HEADS[meta['head']]}. Apply it with "
             "`downstream predict --model <this folder or URL> <shards | DICOM folder | NIfTI files> --out <dir>`; "
             "measure it on another cohort with `downstream evaluate --model <this> --shards <set>`.", "",
             "## Backbones", "", "| plane | URL | weights sha256 |", "|---|---|---|"]
    lines += [f"| {p} | `{b['url']}` | `{b['sha256']}` |" for p, b in meta["backbones"].items()]
    lines += ["", "Loading refuses a backbone whose weights or config.json do not match these sha256.", "",
              "## Data", ""]
    if synthetic:
        lines += ["**Trained and tested on synthetic studies (`shards.synth` phantoms), not patient data.**", ""]
    lines += [f"- Shard set `{manifest.get('name', '?')}` (schema v{manifest.get('schema_version', '?')}): "
              f"{stats.get('n_samples', '?')} studies; joints {_counts(stats.get('joint'))}",
              f"- Sites: {_counts(stats.get('site'))}; vendors: {_counts(stats.get('vendor'))}; "
              f"field strength (T): {_counts(stats.get('field_strength'))}",
              f"- This task: {counts.get('n_train')} training studies (split `{counts.get('train_split')}`), "
              + (f"{counts['n_select']} for model selection and thresholds (split `{counts.get('select_split')}`), "
                 if counts.get("n_select") else "")
              + f"{counts.get('n_eval')} test studies (split `{counts.get('eval_split')}`)", "",
              "## Preprocessing", "", "Per plane, stored in `task_model.json` and applied by "
              "`pretrain.preprocess.preprocess_volume`:", ""]
    lines += [f"- {p}: grid {'x'.join(map(str, s['shape']))} ({s['spatial']}), {_intensity(s)}"
              for p, s in meta["preprocessing"].items()]
    lines += ["", f"## Metrics (split `{meta['metrics_split']}`, patient level, 95% bootstrap intervals)", ""]
    validated = meta["threshold_source"].startswith("validation")
    lines += diagnosis_rows(metrics, validated) if kind == "diagnosis" else segmentation_rows(metrics)
    lines += multiclass_rows(metrics)
    if kind == "diagnosis":
        lines += ["", f"Decision thresholds ({meta['threshold_source']}): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in meta["thresholds"].items())]
    if config.get("ehr", {}).get("enabled"):
        lines += ["", "This task model is the run's image-only head; the run's EHR-only and image+EHR models "
                  "(in its `models/` folder) are not part of it."]
    lines += ["", "## Limitations", "",
              "- Small training set; intervals are wide and the point estimates are uncertain.",
              "- Trained on the sites, vendors and field strengths listed above; performance on others is "
              "unknown until measured (`downstream evaluate`).",
              "- Inputs must match the stored preprocessing (intensity scale, planes); `predict` refuses a study "
              "whose intensities fall mostly outside the stored window.",
              "- Not for clinical use.", "",
              "## Files", "", "`task_model.json` (vocabulary, preprocessing, backbones, thresholds), "
              "`heads.safetensors`, `task_config.yaml` (resolved task config), `metrics.json`, this card.", ""]
    if not synthetic:
        lines.insert(lines.index("## Limitations") + 2, "- Trained on the data summarised above; check its "
                     "population before applying the model elsewhere.")
    return "\n".join(lines)
