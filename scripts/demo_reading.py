"""Two lines that say what the demo's final table means, read from its run folder's metrics.json.

The verdict is on the task's head on the pretrained features ('diffusion') against the same head on a
random-init copy ('random_backbone'): a fixed rule, never the best model on the test split.

    python scripts/demo_reading.py runs/finetune/demo-knee-dx [--label effusion]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

PRETRAINED = "diffusion"
PROBE = "probe"


def cell(m: dict) -> str:
    lo, hi = m.get("ci", {}).get("auroc", [math.nan, math.nan])
    return f"{m['auroc']:.2f} [{lo:.2f}, {hi:.2f}]"


def reading(metrics: dict, label: str) -> list[str]:
    models = metrics["metrics"]
    head = models[PRETRAINED]
    judged = PRETRAINED
    n_pat = head["n_patients"]
    lo = models[judged]["per_label"][label].get("ci", {}).get("auroc", [math.nan])[0]
    verdict = "above chance (interval above 0.5)" if lo > 0.5 else "NOT shown above chance (interval reaches 0.5)"
    per_model = "; ".join(f"{name} {cell(m['per_label'][label])}" for name, m in models.items())
    base = "random_backbone"
    if base in models:
        b = models[base]["per_label"][label]
        hi = b.get("ci", {}).get("auroc", [math.nan, math.nan])[1]
        verdict += ("; above the interval of the same model on a random-init copy: pretraining helps here" if lo > hi
                    else f"; the same model on a random-init copy reaches {cell(b)}, so this finding alone does not "
                         "show that pretraining helps")
    macro = ", ".join(f"{name} {m['macro']['auroc']:.2f}" for name, m in models.items())
    return [f"Reading: AUROC per model on {n_pat} test patients ({metrics['n_eval']} studies) after training on "
            f"{metrics['n_train']} studies; 0.5 = chance, 1 = perfect, [lo, hi] = 95% bootstrap interval over patients. "
            f"'{PRETRAINED}' is the head on the pretrained backbone's frozen features"
            + (f", {PROBE!r} the reference logistic probe on them" if PROBE in models else "")
            + "; random_backbone is the same head on a random-init copy; scratch_cnn and mrnet_2d learn from the pixels.",
            f"{label} (a conspicuous finding): {per_model} -> on the pretrained features '{judged}' is {verdict}. "
            f"Macro AUROC over {len(head['per_label'])} labels: {macro}; subtle findings stay near chance at "
            f"this data size (every label: {metrics['run_dir']}/metrics.json)."]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a downstream finetune run folder")
    p.add_argument("--label", default="effusion")
    args = p.parse_args()
    metrics = json.loads((Path(args.run) / "metrics.json").read_text())
    print("\n".join(reading(metrics, args.label)))


if __name__ == "__main__":
    main()
