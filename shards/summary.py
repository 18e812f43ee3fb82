"""A human-readable dataset summary from a manifest (``shards info``)."""

from __future__ import annotations

from .schema import LABELS, PLANES


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
    for joint, labels in st.get("labels", {}).items():
        lines.append(f"labels ({joint}):")
        order = LABELS.get(joint, tuple(sorted(labels)))
        for name, c in sorted(labels.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99):
            prev = "-" if c.get("prevalence") is None else f"{c['prevalence']:.2f}"
            lines.append(f"  {name:18s} pos {c['pos']:<4d} neg {c['neg']:<4d} unknown {c['unknown']:<3d} "
                         f"prevalence {prev}")
    return "\n".join(lines)
