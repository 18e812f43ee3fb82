"""Reconstruction benchmark: VarNet vs U-Net vs zero-filled on synthetic equispaced 4x/8x k-space.

    OMP_NUM_THREADS=1 python scripts/bench_recon.py [--steps N] [--out data/shards/recon-bench] [--serial]

1. builds the recon-bench shards (configs/shards/recon-bench.yaml) unless they exist;
2. trains the VarNet and the U-Net baseline with the same engine (``pretrain run``, local launcher,
   DeepSpeed), the same data, masks, optimiser and step budget (configs/pretrain/recon-bench-*.yaml;
   ``--steps`` overrides both); the two runs go in parallel, one core each, unless ``--serial``;
3. publishes both and scores them with ``pretrain eval-recon`` on the validation split
   (equispaced 1D, 4x and 8x, fastMRI centre fractions; fastMRI NMSE/PSNR/SSIM per volume);
4. times the trained VarNet's inference (slices/s, batch 1 and batch 8) on this machine's CPU, and on
   a GPU when one is present (``torch.cuda.is_available()``);
5. writes the figures and the verdict against the target to ``docs/perf/recon.md``, with a paired
   bootstrap 95% interval of the per-volume SSIM difference VarNet - U-Net.

``--eval-only`` re-scores the backbones already published under ``--hub`` (no build, no training;
training seconds are read from the runs' ``metrics.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"varnet": "configs/pretrain/recon-bench-varnet.yaml", "unet": "configs/pretrain/recon-bench-unet.yaml"}
PUBLISHED = {"varnet": "recon-varnet", "unet": "recon-unet-recon"}


def build_data(out: Path) -> None:
    from shards.build import BuildConfig, build_shards
    from shards.config import load_config

    if not (out / "recon" / "manifest.json").is_file():
        build_shards(load_config(BuildConfig, ROOT / "configs/shards/recon-bench.yaml", [f"out={out}"]))


def _pretrain(*argv: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "pretrain.cli", *argv], check=True, cwd=ROOT, env=env)


def training_seconds(method: str) -> float:
    """Start-to-done wall time of the method's run, from its ``metrics.jsonl`` events."""
    path = ROOT / "runs" / "pretrain" / Path(CONFIGS[method]).stem / "recon" / "metrics.jsonl"
    events = {r.get("event"): r["time"] for r in map(json.loads, path.read_text().splitlines()) if "event" in r}
    return events["done"] - events["start"]


def train_and_publish(method: str, data: Path, steps: int | None, hub: Path) -> str:
    """A fresh run (not a resumed one) of one method; returns the published folder."""
    config = CONFIGS[method]
    name = Path(config).stem
    shutil.rmtree(ROOT / "runs" / "pretrain" / name, ignore_errors=True)
    overrides = [f"data.source={data}"]
    if steps:
        overrides += [f"optim.total_steps={steps}", f"checkpoint_every={steps}"]
    _pretrain("run", "--config", config, *overrides)
    _pretrain("publish", name, "--to", str(hub), "--overwrite")
    return str(hub / PUBLISHED[method])


def throughput(url: str, data: Path, batch: int, device: str, repeats: int = 5) -> float:
    from pretrain.recon.publish import load_recon_backbone
    from pretrain.recon.transforms import ReconTransform, ReconTransformConfig, collate_recon
    from shards.reader import iter_samples

    recon = OmegaConf.load(ROOT / CONFIGS["varnet"]).model.recon
    model = load_recon_backbone(url).to(device).eval()
    tf = ReconTransform(ReconTransformConfig(masks=OmegaConf.to_container(recon.masks)[:1], grid=list(recon.grid),
                                             virtual_coils=recon.virtual_coils))
    items = [tf(s) for _, s in zip(range(batch), iter_samples(str(data), "val", ("meta", "kspace", "target")))]
    b = collate_recon(items)
    args = (b["masked_kspace"].to(device), b["mask"].to(device), b["num_low_frequencies"])
    times = []
    with torch.no_grad():
        model(*args)
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(*args)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def _ssim(summary: list[dict], method: str, acc: float) -> float:
    return next(r["ssim"] for r in summary
                if r["group"] == "all" and r["method"] == method and r["acceleration"] == acc)


def paired_difference(volumes: list[dict], acc: float, boots: int = 10000) -> tuple[float, float, float, int, int]:
    """Mean per-volume SSIM difference VarNet - U-Net, its paired bootstrap 95% interval, wins, volumes."""
    ssim: dict[str, dict[str, float]] = {}
    for r in volumes:
        if r["acceleration"] == acc:
            ssim.setdefault(r["method"], {})[r["volume"]] = r["ssim"]
    diff = np.array([ssim["backbone"][v] - ssim["unet"][v] for v in sorted(ssim["backbone"])])
    rng = np.random.default_rng(0)
    means = diff[rng.integers(0, len(diff), (boots, len(diff)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(lo), float(hi), int((diff > 0).sum()), len(diff)


def verdict(summary: list[dict], volumes: list[dict]) -> list[str]:
    """The target: VarNet SSIM well above zero-filled and above the U-Net, at 4x and at 8x."""
    rows = ["| acceleration | VarNet SSIM | U-Net SSIM | zero-filled SSIM | VarNet - U-Net [paired 95% CI] "
            "| VarNet better on | VarNet - zero-filled |", "|---|---|---|---|---|---|---|"]
    met, unsure = True, []
    for acc in (4.0, 8.0):
        v, u, z = (_ssim(summary, m, acc) for m in ("backbone", "unet", "zero-filled"))
        mean, lo, hi, wins, n = paired_difference(volumes, acc)
        met &= v > u and v - z > 0.1
        if lo <= 0 < mean:
            unsure.append(f"{acc:g}x")
        rows.append(f"| {acc:g}x | {v:.4f} | {u:.4f} | {z:.4f} | {mean:+.4f} [{lo:+.4f}, {hi:+.4f}] "
                    f"| {wins}/{n} volumes | {v - z:+.4f} |")
    outcome = ("**Target met** on the mean: the VarNet beats the U-Net baseline and, by more than 0.1 SSIM, "
               "zero-filling at both accelerations." if met else "**Target not met** (see the rows above).")
    if met and unsure:
        outcome += (f" At {', '.join(unsure)} the paired interval of the difference to the U-Net includes 0: "
                    "on these validation volumes that margin is not distinguishable from no difference.")
    return rows + ["", outcome]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/shards/recon-bench")
    ap.add_argument("--steps", type=int, default=None, help="training steps for both (default: the configs')")
    ap.add_argument("--hub", default="runs/hub-recon-bench")
    ap.add_argument("--doc", default="docs/perf/recon.md")
    ap.add_argument("--serial", action="store_true", help="train one method after the other")
    ap.add_argument("--eval-only", action="store_true", help="re-score the backbones published under --hub")
    args = ap.parse_args()
    torch.manual_seed(0)
    t_all = time.perf_counter()
    out = Path(args.out).resolve()
    data, hub = out / "recon", Path(args.hub).resolve()
    if args.eval_only:
        trained = {m: str(hub / PUBLISHED[m]) for m in CONFIGS}
        if missing := [u for u in trained.values() if not (Path(u) / "config.json").is_file()]:
            raise SystemExit(f"--eval-only: no published backbone at {', '.join(missing)}; run without it first")
    else:
        build_data(out)
        with ThreadPoolExecutor(max_workers=1 if args.serial else 2) as pool:
            jobs = {m: pool.submit(train_and_publish, m, data, args.steps, hub) for m in CONFIGS}
            trained = {m: job.result() for m, job in jobs.items()}
    varnet, unet = trained["varnet"], trained["unet"]
    t_var, t_unet = training_seconds("varnet"), training_seconds("unet")
    from pretrain.recon.publish import load_recon_backbone

    steps = json.loads((Path(varnet) / "metrics.json").read_text()).get("steps", args.steps)

    from pretrain.recon.evaluate import EvalReconConfig, evaluate_recon
    from shards.config import load_config

    cfg = load_config(EvalReconConfig, None, [f"backbone={varnet}", f"source={data}", f"baselines.unet={unet}",
                                              "masks=[equispaced1d]", "accelerations=[4,8]", "name=recon-bench"])
    result = evaluate_recon(cfg)
    speed = {f"CPU, batch {b}": round(throughput(varnet, data, b, "cpu"), 2) for b in (1, 8)}
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
        speed |= {f"GPU ({gpu}), batch {b}": round(throughput(varnet, data, b, "cuda"), 2) for b in (1, 8, 32)}
    else:
        gpu = "no GPU in this environment: GPU throughput not measured"
    params = {m: sum(p.numel() for p in load_recon_backbone(url).parameters()) for m, url in (("varnet", varnet),
                                                                                               ("unet", unet))}
    recon = OmegaConf.load(ROOT / CONFIGS["varnet"]).model.recon
    doc = [
        "# Reconstruction benchmark (VarNet vs U-Net vs zero-filled)", "",
        f"Command: `OMP_NUM_THREADS=1 python scripts/bench_recon.py{' --serial' if args.serial else ''}"
        f"{f' --steps {args.steps}' if args.steps else ''}{' --eval-only' if args.eval_only else ''}` "
        f"(total {time.perf_counter() - t_all:.0f} s on this machine"
        f"{', scoring only; the backbones were trained by the same command without --eval-only' if args.eval_only else ''}).",
        "",
        f"- Machine: {platform.machine()} CPU, torch {torch.__version__}, 1 thread per training run "
        f"({os.cpu_count()} cores); {gpu}.",
        "- Data: `configs/shards/recon-bench.yaml` (synthetic knee/ankle/shoulder k-space, 8/6/10 coils, "
        "96x96 sagittal/coronal and 80x96 axial slices), validation split "
        f"({result['slices']} slices); training brings slices to a {recon.grid[0]}x{recon.grid[1]} grid and "
        f"{recon.virtual_coils} SVD virtual coils.",
        f"- Training: same engine (`pretrain run`, local launcher, DeepSpeed CPU), {steps} steps of batch 4, "
        "equispaced 1D masks at 4x (centre 0.08) and 8x (0.04) drawn per slice, fastMRI SSIM loss; "
        f"VarNet {params['varnet']:,} parameters ({t_var:.0f} s), U-Net {params['unet']:,} parameters "
        f"({t_unet:.0f} s){'' if args.serial else ', the two trained at the same time, one core each'}.",
        "- Evaluation: `pretrain eval-recon` (fastMRI NMSE/PSNR/SSIM per volume, data range = volume max, "
        "centre crop), masks seeded per slice, native slice grids; rows `backbone` = VarNet, `unet` = U-Net.", "",
        "## Outcome", "", *verdict(result["summary"], result["volumes"]), "",
        *[t + "\n" for t in result["tables"]],
        "## VarNet inference throughput", "",
        *[f"- {k}: {v} slices/s" for k, v in speed.items()], "",
        "Figure of target / zero-filled / reconstructions / error maps (written by eval-recon to "
        f"`{Path(result['run_dir']).relative_to(ROOT) if Path(result['run_dir']).is_relative_to(ROOT) else result['run_dir']}"
        "/examples.png`, copied here): `docs/perf/recon-examples.png`.", ""]
    Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(result["run_dir"]) / "examples.png", Path(args.doc).parent / "recon-examples.png")
    Path(args.doc).write_text("\n".join(doc))
    print("\n".join(doc))
    print(json.dumps({"throughput_slices_per_s": speed, "train_s": {"varnet": t_var, "unet": t_unet}}))


if __name__ == "__main__":
    main()
