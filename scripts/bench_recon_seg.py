"""Reconstruction meets analysis, measured: state size and time of the multitask study and its parts.

    OMP_NUM_THREADS=1 python scripts/bench_recon_seg.py [--shards data/shards/tiny] [--steps 100]

1. builds the tiny shards (configs/shards/tiny.yaml: 32x32 slices, knee 4 coils) unless they exist;
2. runs ``downstream recon-seg-study`` (configs/sweeps/recon-seg.yaml; multitask, VarNet, two segmenters,
   ``--steps`` each, local launcher) and reads per run its parameters, safetensors bytes, training wall
   time and median step time; then the study's SSIM/Dice table;
3. times the acceleration study's per-slice work (k-space simulation + undersampling + zero-filled +
   VarNet, 8x) and the VarNet's slice-wise volume features (``ReconVolumeFeatures``, 8x32x32 volumes);
4. writes ``docs/perf/recon-seg.md`` with ``uptime`` before and after (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def run_facts(study: Path, name: str, url: str) -> dict:
    events = [json.loads(x) for x in (study / "runs" / name / "recon" / "metrics.jsonl").read_text().splitlines()]
    marks = {e["event"]: e["time"] for e in events if "event" in e}
    steps = [e["step_s"] for e in events if "step_s" in e][1:]  # the first logged interval holds start-up
    cfg = json.loads((Path(url) / "config.json").read_text())
    weights = Path(url) / "diffusion_pytorch_model.safetensors"
    from pretrain.recon.publish import load_recon_backbone

    n = sum(p.numel() for p in load_recon_backbone(url).parameters())
    return {"run": name, "class": cfg["_class_name"], "params": n, "safetensors_bytes": weights.stat().st_size,
            "train_s": round(marks.get("done", marks["start"]) - marks["start"], 1),
            "median_step_s": round(statistics.median(steps), 3) if steps else None}


def time_acceleration(shards: Path, varnet_url: str, n: int = 16) -> dict:
    from downstream.recon.acceleration import AccelerationStudyConfig, reconstruct, simulate
    from downstream.recon.common import mask_spec
    from downstream.predictor import Study
    from pretrain.recon.evaluate import trained_transform
    from pretrain.recon.publish import load_recon_backbone
    from pretrain.recon.volume import ReconVolumeFeatures
    from shards.reader import iter_samples

    cfg = AccelerationStudyConfig(task_models=["-"], varnet=varnet_url, coils={"knee": 4})
    varnet = load_recon_backbone(varnet_url)
    tcfg = trained_transform(varnet_url)
    studies = [Study(s["__key__"], "knee", {"sag": s["sag"]}) for s in
               iter_samples(str(shards), "test", ["meta", "sag"], joints=["knee"], require=("sag",))][:n]
    t0 = time.perf_counter()
    sims = [simulate(cfg, s, "sag") for s in studies]
    t1 = time.perf_counter()
    from dataclasses import replace

    for sim in sims:
        reconstruct(sim, replace(tcfg, masks=[mask_spec("equispaced1d", 8)], grid=None), varnet)
    t2 = time.perf_counter()
    feats = ReconVolumeFeatures(varnet).eval()
    vols = torch.from_numpy(np.stack([s.volumes["sag"] for s in studies])[:, None].astype(np.float32))
    with torch.no_grad():
        t3 = time.perf_counter()
        feats.features(vols, None, ["cascade1/mid", "cascade1/up.1"])
        t4 = time.perf_counter()
    slices = sum(len(s) for s in sims)
    return {"studies": len(studies), "slices": slices, "simulate_slices_per_s": round(slices / (t1 - t0), 1),
            "undersample_zf_varnet_slices_per_s": round(slices / (t2 - t1), 1),
            "volume_features_volumes_per_s": round(len(studies) / (t4 - t3), 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", default="data/shards/tiny")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--out", default="runs/bench-recon-seg")
    args = ap.parse_args()
    shards = ROOT / args.shards
    before = uptime()
    if not (shards / "recon" / "manifest.json").is_file():
        from shards.build import BuildConfig, build_shards
        from shards.config import load_config

        build_shards(load_config(BuildConfig, ROOT / "configs/shards/tiny.yaml", [f"out={shards}"]))
    from downstream.recon.multitask_study import ReconSegStudyConfig, run_recon_seg_study
    from shards.config import load_config

    t0 = time.perf_counter()
    cfg = load_config(ReconSegStudyConfig, ROOT / "configs/sweeps/recon-seg.yaml",
                      [f"source={shards / 'recon'}", f"overrides=[optim.total_steps={args.steps}]",
                       f"out={ROOT / args.out}", f"name=steps{args.steps}"])
    result = run_recon_seg_study(cfg)
    study_s = time.perf_counter() - t0
    study = Path(result["run_dir"])
    urls = json.loads((study / "metrics.json").read_text())["models"]
    runs = [run_facts(study, name, url) for name, url in urls.items()]
    accel = time_acceleration(shards, urls["varnet"])
    after = uptime()
    write_doc(args, runs, result["summary"], accel, study_s, before, after)


def write_doc(args, runs, summary, accel, study_s, before, after) -> None:
    from downstream.recon.common import fmt

    lines = ["# Reconstruction + segmentation: state size and time", "",
             f"`OMP_NUM_THREADS=1 python scripts/bench_recon_seg.py --steps {args.steps}` on {args.shards} "
             "(`configs/shards/tiny.yaml`: 32x32 slices, knee 4 coils -> 3 GCC virtual coils), CPU, local launcher (DeepSpeed, 1 process).",
             "The machine is shared (other engineers' tests and a long benchmark): times are under that load.", "",
             f"- `uptime` before: `{before}`", f"- `uptime` after: `{after}`",
             f"- whole `downstream recon-seg-study` (4 trainings x {args.steps} steps, publish, evaluation 4x/8x): "
             f"{study_s:.0f} s", "",
             "| run | class | parameters | safetensors bytes | training wall s | median step s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['class']} | {r['params']:,} | {r['safetensors_bytes']:,} | {r['train_s']} | "
              f"{r['median_step_s']} |" for r in runs]
    lines += ["", "Acceleration-study work per slice and recon features (VarNet above, CPU, batch = one volume):", "",
              f"- {accel['slices']} slices of {accel['studies']} knee test studies: k-space simulation "
              f"{accel['simulate_slices_per_s']} slices/s; 8x undersampling + zero-filled + VarNet "
              f"{accel['undersample_zf_varnet_slices_per_s']} slices/s",
              f"- `ReconVolumeFeatures` (cascade1/mid + cascade1/up.1) on 8x32x32 volumes: "
              f"{accel['volume_features_volumes_per_s']} volumes/s", "",
              "Study result at this scale (test split, means over volumes, 95% bootstrap intervals):", "",
              "| acceleration | method | SSIM | Dice |", "|---|---|---|---|"]
    lines += [f"| {r['acceleration']:g}x | {r['method']} | {fmt(r['ssim'])} | {fmt(r['dice'])} |" for r in summary]
    lines += ["", "Tiny networks, tiny data, one seed: a measured pipeline, not evidence for either design.", ""]
    out = ROOT / "docs" / "perf" / "recon-seg.md"
    out.write_text("\n".join(lines))
    print(out.read_text())


if __name__ == "__main__":
    main()
