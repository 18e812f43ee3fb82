"""A human-readable dataset summary from a manifest (``shards info``)."""

from __future__ import annotations

from .dataset import dataset_of
from .schema import PLANES


def _counts(d: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(d.items())) or "-"


def format_summary(manifest: dict) -> str:
    st = manifest["stats"]
    lines = [f"{manifest.get('name', '?')}  (schema v{manifest['schema_version']}, kind {manifest['kind']}, "
             f"{st['n_samples']} samples in {len(manifest['shards'])} shards, "
             f"{sum(s['bytes'] for s in manifest['shards']) / 1e6:.1f} MB)",
             "splits: " + ", ".join(f"{k}: {v['n_samples']} samples / {len(v.get('patients', []))} patients"
                                    for k, v in sorted(manifest["splits"].items()))]
    for field in ("joint", "site", "field_strength", "vendor", "anatomy", "coils"):
        if st.get(field):
            lines.append(f"{field}: {_counts(st[field])}")
    if st.get("planes"):
        lines.append("planes:")
        for plane, ps in sorted(st["planes"].items(), key=lambda kv: PLANES.index(kv[0])):
            lines.append(f"  {plane:4s} n={ps['n']:<5d} shape {'x'.join(map(str, ps['common_shape']))}  "
                         f"spacing {ps['spacing_mean']} mm  p99.5 {ps['intensity']['p99.5']:.3f}  "
                         f"contrast {_counts(ps['contrast'])}")
    dataset = dataset_of(manifest) if manifest.get("kind") == "study" else None
    for joint, labels in st.get("labels", {}).items():
        lines.append(f"labels ({joint}):")
        specs = dataset.anatomies[joint].labels if dataset and joint in dataset.anatomies else {}
        order = list(specs) or sorted(labels)
        for name, c in sorted(labels.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99):
            spec = specs.get(name)
            if spec is not None and spec.type != "binary":
                counts = c.get("values", {})
                lines.append(f"  {name:18s} {spec.type}: " + ", ".join(
                    f"{cls} {counts.get(str(i), 0)}" for i, cls in enumerate(spec.classes)) + f", unknown {c['unknown']}")
                continue
            prev = "-" if c.get("prevalence") is None else f"{c['prevalence']:.2f}"
            lines.append(f"  {name:18s} pos {c['pos']:<4d} neg {c['neg']:<4d} unknown {c['unknown']:<3d} "
                         f"prevalence {prev}")
    if dataset is not None:
        for anatomy, spec in dataset.anatomies.items():
            if spec.structures:
                lines.append(f"structures ({anatomy}): " + ", ".join(f"{v}={n}" for n, v in spec.structures.items()))
    return "\n".join(lines)
