"""Markdown reports of 3D segmentation runs: test sets side by side, as MRAnnotator's tables."""

from __future__ import annotations


def fmt(s: dict, digits: int = 3) -> str:
    if not s or s.get("mean") is None:
        return "–"
    lo, hi = s["ci"]
    return f"{s['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}] (n={s['n']})"


def side_by_side(sets: dict, metric: str) -> list[str]:
    names = list(sets)
    structures = sorted({s for r in sets.values() for s in r["per_structure"]},
                        key=lambda s: list(next(iter(sets.values()))["per_structure"]).index(s)
                        if s in next(iter(sets.values()))["per_structure"] else 10**6)
    lines = [f"| structure | {' | '.join(names)} |", "|---|" + "---|" * len(names)]
    for s in structures:
        cells = [fmt(sets[n]["per_structure"].get(s, {}).get(metric), 3 if metric == "dice" else 1) for n in names]
        lines.append(f"| {s} | {' | '.join(cells)} |")
    regions = sorted({r for res in sets.values() for r in res["per_region"]})
    for r in regions:
        cells = [fmt(sets[n]["per_region"].get(r, {}).get(metric), 3 if metric == "dice" else 1) for n in names]
        lines.append(f"| **region {r}** | {' | '.join(cells)} |")
    lines.append(f"| **all** | {' | '.join(fmt(sets[n]['overall'].get(metric), 3 if metric == 'dice' else 1) for n in names)} |")
    return lines


def counts(sets: dict) -> list[str]:
    lines = ["| set | structure | present | absent (excluded) | predicted while absent | missed |", "|---|---|---|---|---|---|"]
    for n, res in sets.items():
        for s, r in res["per_structure"].items():
            if r["n_absent"] or r["n_false_positive"] or r["n_missed"]:
                lines.append(f"| {n} | {s} | {r['n_present']} | {r['n_absent']} | {r['n_false_positive']} | {r['n_missed']} |")
    return lines


def render_report(metrics: dict) -> str:
    sets = metrics["sets"]
    out = [f"# 3D segmentation: {metrics['model']}", "",
           "Dice and HD95 (mm, native grid): mean over the cases where the structure is present, "
           "95% percentile-bootstrap interval, n cases. Absent structures are excluded and counted below.", ""]
    for n, res in sets.items():
        kind = "external" if n in metrics.get("external", ()) else "internal"
        meta = ", ".join(f"{k} {v}" for k, v in res.get("meta", {}).items())
        out.append(f"- **{n}** ({kind}): {res['n_cases']} studies; {meta}")
    if metrics.get("hold_out"):
        out.append(f"- held out of training: {metrics['hold_out']}")
    out += ["", "## Dice", "", *side_by_side(sets, "dice"), "", "## HD95 (mm)", "", *side_by_side(sets, "hd95"),
            "", "## Absent, false-positive and missed structures", "", *counts(sets), ""]
    if metrics.get("undeclared"):
        out += ["## Label maps with undeclared values (those voxels not scored)", ""]
        out += [f"- {u['set']}: study {u['study']}: values {u['values']}" for u in metrics["undeclared"]]
    return "\n".join(out) + "\n"
