"""3D segmentation benchmark on this machine: one model for six regions' structures, pretrained
(diffusion backbone's encoder + bottleneck) vs scratch (same architecture, random) at several numbers
of labelled volumes, the nnU-Net-like DynUNet beside them, internal (sites A-C) vs external (site D).

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/bench_seg3d.py [--out runs/bench-seg3d] [--labelled 6,12,0]
        [--arms pretrained,scratch,dynunet]   # several processes may split the arms (same --out)
    python scripts/bench_seg3d.py --out runs/bench-seg3d --report      # merge results-*.json, draw the figure

1. builds the cohort (configs/shards/seg3d-bench.yaml) and its external site (seed 1, site D);
2. pretrains the diffusion backbone on the unlabelled `pretrain` split (configs/pretrain/seg3d-bench-backbone.yaml)
   with the engine and publishes it;
3. trains each arm with the engine (configs/pretrain/seg3d-bench.yaml; 0 labelled = all train studies),
   publishes it, and scores it with ``downstream seg3d-eval`` (configs/seg3d/eval-bench.yaml);
4. writes results-<arms>.json per process and, with --report, results.json, a markdown table and a
   figure (Dice vs labelled volumes) under --out, with the load average read at each arm (the machine is
   shared: timings are under that load).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REGIONS = ("knee", "ankle", "shoulder", "hip", "elbow", "wrist")


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def build(out: Path) -> tuple[Path, Path]:
    from shards.build import BuildConfig, build_shards
    from shards.config import load_config

    internal, external = out / "shards", out / "shards-external"
    if not (internal / "manifest.json").is_file():
        build_shards(load_config(BuildConfig, ROOT / "configs/shards/seg3d-bench.yaml", [f"out={internal}"]), progress=False)
    if not (external / "manifest.json").is_file():
        build_shards(load_config(BuildConfig, ROOT / "configs/shards/seg3d-bench.yaml", [
            f"out={external}", "synth.seed=1", "synth.n_patients=24", "synth.sites=[D]",
            "splits={test: 1.0}"]), progress=False)
    return internal, external


def train_and_publish(config: str, overrides: list[str], out: Path, hub: str = "hub") -> tuple[str, float, dict]:
    from pretrain.config import PretrainConfig
    from pretrain.run import publish_run, train
    from shards.config import load_config

    cfg = load_config(PretrainConfig, ROOT / config, overrides + [f"run_root={out / 'runs'}",
                                                                  f"storage_path={out / 'ckpt'}"])
    t0 = time.perf_counter()
    result = train(cfg)["sag"]
    seconds = time.perf_counter() - t0
    url = publish_run(cfg, str(out / hub), overwrite=True)["sag"]
    return url, seconds, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench-seg3d")
    ap.add_argument("--labelled", default="6,12,0", help="labelled training volumes per arm (0 = all)")
    ap.add_argument("--steps", type=int, default=None, help="override the segmentation runs' steps")
    ap.add_argument("--arms", default="pretrained,scratch,dynunet", help="which arms this process runs")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override of the segmentation runs (repeatable), e.g. model.patch=[8,48,48]")
    ap.add_argument("--val", action="store_true", help="tuning: score on the `pretrain` split (studies no "
                    "segmentation model trains on; the backbone saw their images, never their labels), not the test sets")
    ap.add_argument("--tag", default="", help="suffix of this process's run names and results file")
    ap.add_argument("--report", action="store_true", help="only merge the results and draw the figure")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        report(out)
        return
    record = {"load_start": load(), "arms": []}
    internal, external = build(out)
    bb_url = str(out / "hub" / f"{'+'.join(REGIONS)}-sag")
    if not (Path(bb_url) / "config.json").is_file():
        bb_url, bb_s, bb = train_and_publish("configs/pretrain/seg3d-bench-backbone.yaml", [f"data.source={internal}"], out)
        record["backbone"] = {"url": bb_url, "seconds": round(bb_s, 1), "final_loss": bb["final_loss"]}
    arms = [arm for n in args.labelled.split(",") for arm in (  # pairs by size: a cut-short run still compares
        ("pretrained", n, ["model.arch=diffusion_unet", f"model.init_from={bb_url}"]),
        ("scratch", n, ["model.arch=diffusion_unet", f"model.init_from={bb_url}", "model.load_weights=false"]))]
    arms += [("dynunet", "0", ["model.arch=dynunet", "model.filters=[8,16,32]"])]
    arms = [a for a in arms if a[0] in args.arms.split(",")]
    tag = f"-{args.tag}" if args.tag else ""
    results = out / f"{'tune' if args.val else 'results'}-{args.arms.replace(',', '+')}{tag}.json"
    record["overrides"] = args.set
    scoring = (("configs/seg3d/eval-bench-val.yaml", [f"sets.val.source={internal}"]) if args.val else
               ("configs/seg3d/eval-bench.yaml", [f"sets.internal.source={internal}", f"sets.external.source={external}"]))
    from downstream.seg3d.evaluate import run_seg_eval
    from shards.config import ConfigError

    for init, n, extra in arms:
        name = f"seg3d-bench-{init}-{n}{tag}"
        steps = [f"optim.total_steps={args.steps}"] if args.steps else []
        try:
            url, seconds, result = train_and_publish("configs/pretrain/seg3d-bench.yaml", [
                f"name={name}", f"data.source={internal}", f"data.max_studies={n}", *extra, *steps, *args.set], out,
                f"hub/{name}")  # one folder per arm: processes running side by side never share one
        except ConfigError as exc:  # e.g. a subset without a study of some region: say so, go on
            print(f"{name}: skipped: {exc}", flush=True)
            continue
        t0 = time.perf_counter()
        ev = run_seg_eval(ROOT / scoring[0], [f"name={name}", f"model={url}", *scoring[1]],
            run_dir=out / "eval" / name)
        sets = ev["metrics"]["sets"]
        weights = Path(url) / "model.safetensors"
        record["arms"].append({
            "arm": init, "labelled": int(n), "tag": args.tag, "train_seconds": round(seconds, 1), "eval_seconds": round(time.perf_counter() - t0, 1),
            "steps": result["steps"], "final_loss": result["final_loss"], "state_bytes": weights.stat().st_size,
            "report": str(out / "eval" / name / "report.md"), "load": load(),
            **{f"{s}_dice": sets[s]["overall"]["dice"] for s in sets},
            **{f"{s}_regions": {r: v["dice"] for r, v in sets[s]["per_region"].items()} for s in sets}})
        results.write_text(json.dumps(record, indent=1))
        print(json.dumps(record["arms"][-1]), flush=True)
    record["load_end"] = load()
    results.write_text(json.dumps(record, indent=1))


def report(out: Path) -> None:
    """Merge the processes' results, write results.json, table.md and the figure."""
    parts = [json.loads(p.read_text()) for p in sorted(out.glob("results-*.json"))]
    record = {"arms": [a for p in parts for a in p["arms"]], "backbone": next((p["backbone"] for p in parts if "backbone" in p), None),
              "load": [p["load_start"] for p in parts] + [p.get("load_end") for p in parts]}
    log = out / "runs" / "seg3d-bench-backbone" / "sag" / "metrics.jsonl"
    if record["backbone"] is None and log.is_file():  # trained by a process that did not finish
        events = {r["event"]: r for r in map(json.loads, log.read_text().splitlines()) if "event" in r}
        record["backbone"] = {"seconds": round(events["done"]["time"] - events["start"]["time"], 1),
                              "final_loss": events["done"]["final_loss"], "steps": events["done"]["steps"]}
    (out / "results.json").write_text(json.dumps(record, indent=1))
    figure(record, out / "dice_vs_labelled.png")
    lines = ["| arm | labelled | run | steps | internal Dice | external Dice | train s | eval s | state bytes | load |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = sorted(record["arms"], key=lambda a: (a["arm"], a.get("tag", ""), a["labelled"] or 10**6))
    for a in order:
        d = {t: f"{a[t + '_dice']['mean']:.3f} [{a[t + '_dice']['ci'][0]:.3f}, {a[t + '_dice']['ci'][1]:.3f}]"
             for t in ("internal", "external")}
        lines.append(f"| {a['arm']} | {a['labelled'] or 'all'} | {a.get('tag') or 'main'} | {a['steps']} | {d['internal']} | {d['external']} | "
                     f"{a['train_seconds']} | {a['eval_seconds']} | {a['state_bytes']} | {a['load']} |")
    lines += ["", "Per region, internal / external mean Dice:", ""]
    for a in order:
        regions = [f"{r} {_dice(a, 'internal', r)} / {_dice(a, 'external', r)}" for r in REGIONS]
        lines.append(f"- {a['arm']} {a['labelled'] or 'all'} ({a.get('tag') or 'main'}): " + ", ".join(regions))
    lines += ["", "Pretrained minus scratch, paired by test study (mean Dice of a study's present structures; "
              "95% bootstrap over studies):", ""]
    for a in (a for a in order if a["arm"] == "pretrained"):
        tag = f"-{a['tag']}" if a.get("tag") else ""
        diffs = [f"{test} {paired_difference(out, a['labelled'], tag, test)}" for test in ("internal", "external")]
        lines.append(f"- {a['labelled'] or 'all'} labelled ({a.get('tag') or 'main'}): " + ", ".join(diffs))
    tuning = [json.loads(p.read_text()) for p in sorted(out.glob("tune-*.json"))]
    if tuning:
        lines += ["", "Tuning (scored on the `pretrain` split, never on a test set):", "",
                  "| arm | labelled | steps | overrides | val Dice | train s | load |", "|---|---|---|---|---|---|---|"]
        for t in tuning:
            for a in t["arms"]:
                v = a["val_dice"]
                lines.append(f"| {a['arm']} | {a['labelled'] or 'all'} | {a['steps']} | {' '.join(t['overrides'])} | "
                             f"{v['mean']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}] | {a['train_seconds']} | {a['load']} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def paired_difference(out: Path, labelled: int, tag: str, test: str, n_boot: int = 2000) -> str:
    """Pretrained minus scratch on the same studies of ``test``: mean and 95% percentile bootstrap."""
    import numpy as np
    import pandas as pd

    def per_study(arm):
        cases = out / "eval" / f"seg3d-bench-{arm}-{labelled}{tag}" / "cases.csv"
        if not cases.is_file():
            return None
        frame = pd.read_csv(cases)
        frame = frame[(frame["set"] == test) & frame["present"]]
        return frame.groupby("study")["dice"].mean()

    pre, scr = per_study("pretrained"), per_study("scratch")
    if pre is None or scr is None:
        return "–"
    d = (pre - scr.reindex(pre.index)).to_numpy()
    boot = np.random.default_rng(0).choice(d, (n_boot, len(d))).mean(axis=1)
    return f"{d.mean():+.3f} [{np.quantile(boot, 0.025):+.3f}, {np.quantile(boot, 0.975):+.3f}] (n={len(d)})"


def _dice(arm: dict, test: str, region: str) -> str:
    d = arm[f"{test}_regions"].get(region)
    return f"{d['mean']:.3f}" if d else "–"


def figure(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    sizes = sorted({r["labelled"] for r in record["arms"]}, key=lambda n: n or 10**6)
    tags = sorted({r.get("tag", "") for r in record["arms"]})
    for i, (arm, colour) in enumerate((("pretrained", "C0"), ("scratch", "C1"), ("dynunet", "C2"))):
        for k, tag in enumerate(tags):  # one line per run (main, other seeds): seeds drawn fainter
            rows = sorted((r for r in record["arms"] if r["arm"] == arm and r.get("tag", "") == tag),
                          key=lambda r: r["labelled"] or 10**6)
            if not rows:
                continue
            for test, style, shift in (("internal", "-o", -0.1), ("external", "--s", 0.1)):
                xs = [sizes.index(r["labelled"]) + shift + 0.045 * i + 0.015 * k for r in rows]
                ys = [r[f"{test}_dice"]["mean"] for r in rows]
                lo = [r[f"{test}_dice"]["ci"][0] for r in rows]
                hi = [r[f"{test}_dice"]["ci"][1] for r in rows]
                ax.errorbar(xs, ys, yerr=[[y - a for y, a in zip(ys, lo)], [b - y for y, b in zip(ys, hi)]], fmt=style,
                            color=colour, capsize=3, alpha=1.0 if not tag else 0.45,
                            label=f"{arm} {test}" + (f" ({tag})" if tag else ""))
    ax.set_xticks(range(len(sizes)), [str(n or "all") for n in sizes])
    ax.set_xlim(-0.5, len(sizes) - 0.5)
    ax.set_xlabel("labelled training volumes")
    ax.set_ylabel("mean Dice (95% bootstrap CI)")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
