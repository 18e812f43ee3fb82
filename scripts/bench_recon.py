"""Reconstruction benchmark: VarNet vs U-Net vs zero-filled on synthetic equispaced 4x/8x k-space.

    OMP_NUM_THREADS=1 python scripts/bench_recon.py [--steps 240] [--out data/shards/recon-bench]

1. builds the recon-bench shards (configs/shards/recon-bench.yaml) unless they exist;
2. trains the VarNet and the U-Net baseline with the same engine (``pretrain run``, local launcher,
   DeepSpeed), the same data, masks, optimiser and step budget;
3. publishes both and scores them with ``pretrain eval-recon`` on the validation split
   (equispaced 1D, 4x and 8x; fastMRI NMSE/PSNR/SSIM per volume);
4. times the trained VarNet's inference (slices/s, batch 1 and batch 8) on this machine's CPU;
5. writes the figures to ``docs/perf/recon.md`` (and ``runs/eval-recon/recon-bench/``).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def build_data(out: Path) -> None:
    from shards.build import BuildConfig, build_shards
    from shards.config import load_config

    if not (out / "recon" / "manifest.json").is_file():
        build_shards(load_config(BuildConfig, ROOT / "configs/shards/recon-bench.yaml", [f"out={out}"]))


def train_and_publish(config: str, data: Path, steps: int, hub: Path) -> tuple[str, float]:
    from pretrain.cli import main as pretrain

    name = Path(config).stem
    shutil.rmtree(Path("runs/pretrain") / name, ignore_errors=True)  # a fresh run, not a resumed one
    start = time.perf_counter()
    overrides = [f"data.source={data}", f"optim.total_steps={steps}", f"checkpoint_every={steps}"]
    if pretrain(["run", "--config", config, *overrides]) != 0:
        raise SystemExit(f"training {name} failed")
    seconds = time.perf_counter() - start
    if pretrain(["publish", name, "--to", str(hub), "--overwrite"]) != 0:
        raise SystemExit(f"publishing {name} failed")
    backbone = "varnet" if "varnet" in name else "unet-recon"
    return str(hub / f"recon-{backbone}"), seconds


def throughput(url: str, data: Path, batch: int, repeats: int = 3) -> float:
    from pretrain.recon.publish import load_recon_backbone
    from pretrain.recon.transforms import ReconTransform, ReconTransformConfig, collate_recon
    from shards.reader import iter_samples

    model = load_recon_backbone(url)
    tf = ReconTransform(ReconTransformConfig(grid=[48, 48], virtual_coils=6))
    items = [tf(s) for _, s in zip(range(batch), iter_samples(str(data), "val", ("meta", "kspace", "target")))]
    b = collate_recon(items)
    times = []
    with torch.no_grad():
        model(b["masked_kspace"], b["mask"], b["num_low_frequencies"])
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(b["masked_kspace"], b["mask"], b["num_low_frequencies"])
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/shards/recon-bench")
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--hub", default="runs/hub-recon-bench")
    ap.add_argument("--doc", default="docs/perf/recon.md")
    args = ap.parse_args()
    torch.manual_seed(0)
    t_all = time.perf_counter()
    out = Path(args.out).resolve()
    build_data(out)
    data = out / "recon"
    hub = Path(args.hub).resolve()
    varnet, t_var = train_and_publish("configs/pretrain/recon-bench-varnet.yaml", data, args.steps, hub)
    unet, t_unet = train_and_publish("configs/pretrain/recon-bench-unet.yaml", data, args.steps, hub)

    from pretrain.recon.evaluate import EvalReconConfig, evaluate_recon
    from shards.config import load_config

    cfg = load_config(EvalReconConfig, None, [f"backbone={varnet}", f"source={data}", f"baselines.unet={unet}",
                                              "masks=[equispaced1d]", "accelerations=[4,8]", "name=recon-bench"])
    result = evaluate_recon(cfg)
    Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
    speed = {f"batch {b}": round(throughput(varnet, data, b), 2) for b in (1, 8)}
    gpu = "no GPU in this environment: GPU throughput not measured"
    params = {}
    for name, url in (("varnet", varnet), ("unet", unet)):
        from pretrain.recon.publish import load_recon_backbone
        params[name] = sum(p.numel() for p in load_recon_backbone(url).parameters())
    doc = [
        "# Reconstruction benchmark (VarNet vs U-Net vs zero-filled)", "",
        "Command: `OMP_NUM_THREADS=1 python scripts/bench_recon.py --steps "
        f"{args.steps}` (total {time.perf_counter() - t_all:.0f} s on this machine).", "",
        f"- Machine: {platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} thread(s) "
        f"(2 shared cores); {gpu}.",
        "- Data: `configs/shards/recon-bench.yaml` (synthetic knee/ankle/shoulder k-space, 8/6/10 coils, "
        "48x48 and 40x48 slices), validation split "
        f"({result['slices']} slices); training brings slices to a 48x48 grid and 6 SVD virtual coils.",
        f"- Training: same engine (`pretrain run`, local launcher, DeepSpeed CPU), {args.steps} steps of batch 4, "
        "equispaced 1D masks at 4x (centre 0.08) and 8x (0.04), fastMRI SSIM loss; "
        f"VarNet {params['varnet']:,} parameters ({t_var:.0f} s), U-Net {params['unet']:,} parameters ({t_unet:.0f} s).",
        "- Evaluation: `pretrain eval-recon` (fastMRI NMSE/PSNR/SSIM per volume, data range = volume max, "
        "centre crop), masks seeded per slice; rows `backbone` = VarNet, `unet` = U-Net baseline.", "",
        *[t + "\n" for t in result["tables"]],
        "## VarNet inference throughput (CPU)", "",
        *[f"- {k}: {v} slices/s" for k, v in speed.items()],
        f"- GPU: {gpu}.", "",
        "Figure of target / zero-filled / reconstructions / error maps (written by eval-recon to "
        f"`{result['run_dir']}/examples.png`, copied here): `docs/perf/recon-examples.png`.", ""]
    shutil.copy(Path(result["run_dir"]) / "examples.png", Path(args.doc).parent / "recon-examples.png")
    Path(args.doc).write_text("\n".join(doc))
    print("\n".join(doc))
    print(json.dumps({"throughput_slices_per_s": speed, "train_s": {"varnet": t_var, "unet": t_unet}}))


if __name__ == "__main__":
    main()
