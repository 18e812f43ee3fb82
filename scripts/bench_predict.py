"""Benchmark: ``downstream predict`` throughput (studies/s) in-process and on 1 and 2 Ray workers.

Builds demo-sized knee shards (16x64x64, three planes), publishes demo-sized backbones (the
``demo-knee`` architecture, randomly initialised: throughput does not depend on the weights),
finetunes ``knee-dx`` briefly to get a task model, then predicts every study of the shard set.
``predict_s`` excludes model loading and Ray start-up; ``wall_s`` includes them.

    python scripts/bench_predict.py [--patients 60] [--workers 0 1 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def setup(tmp: Path, patients: int) -> tuple[Path, Path, Path]:
    from downstream.finetune import run_finetune
    from pretrain.models.diffusion import DiffusionBackbone
    from pretrain.preprocess import spec_from_manifest
    from pretrain.publish import publish_backbone
    from shards.build import BuildConfig, build_shards
    from shards.config import load_config

    shards = tmp / "shards"
    build_shards(load_config(BuildConfig, ROOT / "configs/shards/demo.yaml",
                             [f"out={shards}", f"synth.n_patients={patients}", "synth.joints=[knee]",
                              "synth.joint_weights=[1.0]", "synth.kspace.enabled=false", "workers=1",
                              "shard_max_bytes=4000000"]), progress=False)
    from shards.manifest import load_manifest

    manifest, hub = load_manifest(str(shards)), tmp / "hub"
    for plane in ("sag", "cor", "ax"):
        model = DiffusionBackbone(channels=(8, 16), attention_levels=(False, False), num_res_blocks=1,
                                  num_head_channels=8, norm_num_groups=4, plane=plane,
                                  preprocessing=spec_from_manifest(manifest, plane, shape=[8, 32, 32]).to_dict(),
                                  schedule={"num_train_timesteps": 1000})
        publish_backbone(model, model.make_scheduler(), str(hub / f"knee-{plane}"), {}, manifest, {"steps": 0})
    run = tmp / "run"
    run_finetune("knee-dx", [f"shards={shards}", f"cache_dir={tmp / 'cache'}", f"out={tmp}", "train.epochs=2",
                             "baselines.names=[]", "metrics.bootstrap=10", "threads=1",
                             *[f"backbones.{p}={hub / f'knee-{p}'}" for p in ("sag", "cor", "ax")]], run_dir=run)
    return shards, hub, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=60)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args()
    from downstream.predict import load_predict_config, run_predict

    tmp = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    try:
        shards, hub, run = setup(tmp, args.patients)
        results = []
        for workers in args.workers:
            if workers:
                import ray

                if not ray.is_initialized():
                    ray.init(num_cpus=max(2, max(args.workers)), include_dashboard=False, log_to_driver=False,
                             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
            cfg = load_predict_config(None, [f"backbone_dir={hub}", f"workers={workers}", f"threads={args.threads}"])
            t0 = time.perf_counter()
            s = run_predict(str(run), [str(shards)], tmp / f"pred{workers}", cfg)
            wall = time.perf_counter() - t0
            results.append({"workers": workers, "studies": s["n_predicted"], "predict_s": s["timing"]["predict_s"],
                            "studies_per_s": s["studies_per_s"], "wall_s": round(wall, 2),
                            "startup_s": s["timing"].get("startup_s")})
            print(json.dumps(results[-1]))
        print(json.dumps({"results": results, "threads": args.threads, "cpus": os.cpu_count(),
                          "machine": platform.processor() or platform.machine(), "cuda": torch.cuda.is_available(),
                          "shape": "16x64x64 per plane, 3 planes, resized to 8x32x32"}, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
