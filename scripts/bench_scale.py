"""Paper-scale figures: float16 storage (loss and size), feature extraction on one vs two Ray workers,
the shard reader against a raw read of the same bytes. Every figure is printed with the load average.

    python scripts/bench_scale.py --work /tmp/bench-scale --out docs/perf/scale.md

Sections (``--sections``, default all):
  storage:  synthetic knee studies (sagittal 20x288x288) preprocessed with OrthoDiffusion's spec to
            16x256x256 and cached as float32 and float16 (entry sizes on disk, round-trip error);
            OrthoDiffusion-size features (random initialisation, sag t=200 ``mid_0``) of a few studies,
            stored as float16 from float16 volumes (error); per-1,000-study sizes from the formats.
  probe:    the reference probe's macro AUROC (test split) of a tiny task with float32 vs float16 storage.
  extract:  ``downstream features`` on 1 and 2 Ray workers of one torch thread each (cold cache each):
            studies/s of volumes + features after the actors started, and the command's wall time.
  reader:   ``ShardReader`` decoding every field of the storage shards vs reading the same files raw,
            both from the page cache (interleaved, ``--repeat`` passes each; wall-clock and CPU time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from downstream.features import FeatureCache, cached_volumes, manifest_identity  # noqa: E402
from shards.manifest import load_manifest, shard_entries  # noqa: E402

PAPER = (16, 256, 256)


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def build(out: Path, overrides: list[str]) -> Path:
    from shards.build import BuildConfig, build_shards
    from shards.config import load_config

    if not (out / "manifest.json").exists():
        build_shards(load_config(BuildConfig, ROOT / "configs/shards/tiny.yaml", [f"out={out}", "synth.kspace.enabled=false",
                                                                                  "workers=1", *overrides]))
    return out


def entry_bytes(cache: FeatureCache) -> int:
    return sum(p.stat().st_size for p in cache.root.rglob("*") if p.is_file())


def errors(ref: np.ndarray, got: np.ndarray) -> dict:
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    nz = np.abs(ref) > 1e-3 * np.abs(ref).max()
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "max_rel": float((diff[nz] / np.abs(ref[nz])).max()), "mean_rel": float((diff[nz] / np.abs(ref[nz])).mean()),
            "max_abs_over_std": float(diff.max() / ref.std())}


def storage(args, work: Path) -> dict:
    from pretrain.models.orthodiffusion import ORTHODIFFUSION_PREPROCESSING, OrthoDiffusionBackbone

    shards = build(work / "paper-shards", [f"synth.n_patients={args.studies}", "synth.joints=[knee]",
                                           "synth.joint_weights=[1.0]", "synth.planes=[sag]",
                                           "synth.shape.sag=[20,288,288]", "shard_max_count=4"])
    manifest = load_manifest(str(shards))
    keys = sorted(k for s in manifest["shards"] for k in s["keys"])
    spec = {"plane": "sag", **ORTHODIFFUSION_PREPROCESSING}
    vols, sizes = {}, {}
    for dtype in ("float32", "float16"):
        cache = FeatureCache(work / f"cache-{dtype}")
        t0 = time.perf_counter()
        vols[dtype] = np.asarray(cached_volumes(cache, str(shards), manifest_identity(manifest), "knee", "sag", spec, keys,
                                                dtype=dtype)["image"])
        sizes[dtype] = {"entry_bytes": entry_bytes(cache), "seconds": time.perf_counter() - t0}
    torch.manual_seed(0)
    model = OrthoDiffusionBackbone().eval()
    n = min(args.feature_studies, len(keys))
    with torch.no_grad():
        f32 = model.features(torch.from_numpy(vols["float32"][:n]), [200], ["mid_0"])["t200/mid_0"].numpy()
        f16_in = model.features(torch.from_numpy(vols["float16"][:n]), [200], ["mid_0"])["t200/mid_0"].numpy()
    row = {"float32": int(np.prod(PAPER)) * 4, "float16": int(np.prod(PAPER)) * 2}
    frow = {"float32": int(np.prod(f32.shape[1:])) * 4, "float16": int(np.prod(f32.shape[1:])) * 2}
    return {"studies": len(keys), "load": load(), "volume_shape": list(vols["float32"].shape[1:]),
            "volume_entry": sizes, "volume_error": errors(vols["float32"], vols["float16"]),
            "feature_studies": n, "feature_shape": list(f32.shape[1:]),
            "feature_error_storage": errors(f32, f32.astype(np.float16).astype(np.float32)),
            "feature_error_end_to_end": errors(f32, f16_in.astype(np.float16).astype(np.float32)),
            "per_1000": {d: {"volumes_gib_per_plane": 1000 * row[d] / 2**30,
                             "features_mib_per_plane_block": 1000 * frow[d] / 2**20} for d in row},
            "measured_per_study": {d: sizes[d]["entry_bytes"] / len(keys) for d in sizes}}


def probe(args, work: Path) -> dict:
    """Macro AUROC of the reference probe with float32 and float16 storage (tiny task, test split)."""
    from downstream.finetune import run_finetune

    shards = build(work / "probe-shards", ["synth.n_patients=60", "synth.joints=[knee]", "synth.joint_weights=[1.0]",
                                           "synth.planes=[sag]", "shard_max_count=16"])
    hub = publish_tiny(work / "hub", shards, (8, 32, 32))
    out = {"load": load()}
    for dtype in ("float32", "float16"):
        res = run_finetune("knee-dx", [f"shards={shards}", f"cache_dir={work / f'probe-cache-{dtype}'}",
                                       f"out={work / 'probe-runs'}", "planes=[sag]", f"backbones.sag={hub}",
                                       "baselines.names=[]", "train.epochs=2", "metrics.bootstrap=200",
                                       "features.timesteps=[10]", "features.blocks=[mid]",
                                       f"features.volume_dtype={dtype}", f"features.feature_dtype={dtype}"])
        m = res["metrics"]["probe"]
        out[dtype] = {k: v for k, v in m.items() if "auroc" in k and "macro" in k}
    return out


def publish_tiny(out: Path, shards: Path, shape: tuple, channels=(8, 16)) -> Path:
    from pretrain.models.diffusion import DiffusionBackbone
    from pretrain.preprocess import spec_from_manifest
    from pretrain.publish import publish_backbone

    if not (out / "config.json").exists():
        manifest = load_manifest(str(shards))
        torch.manual_seed(1000)
        model = DiffusionBackbone(channels=channels, attention_levels=(False,) * len(channels), num_res_blocks=1,
                                  num_head_channels=8, norm_num_groups=4, plane="sag",
                                  preprocessing=spec_from_manifest(manifest, "sag").to_dict(),
                                  schedule={"num_train_timesteps": 100})
        publish_backbone(model, model.make_scheduler(), str(out), {}, manifest, {"steps": 0})
    return out


def extract(args, work: Path) -> dict:
    from downstream.extract import run_features

    shape = [int(s) for s in args.extract_shape.split(",")]
    shards = build(work / "extract-shards", [f"synth.n_patients={args.extract_patients}", "synth.joints=[knee]",
                                             "synth.joint_weights=[1.0]", "synth.planes=[sag]",
                                             f"synth.shape.sag={shape}", "shard_max_count=4"])
    hub = publish_tiny(work / "extract-hub", shards, shape, channels=(16, 32, 32))
    out = {}
    for workers in (1, 2):
        cache = work / f"extract-cache-{workers}"
        shutil.rmtree(cache, ignore_errors=True)
        before = load()
        t0 = time.perf_counter()
        s = run_features("knee-dx", [f"shards={shards}", f"cache_dir={cache}", "planes=[sag]", f"backbones.sag={hub}",
                                     "baselines.names=[]", "features.timesteps=[50]", "features.blocks=[mid]",
                                     "features.batch_size=2", "features.chunk_rows=4", f"features.workers={workers}",
                                     "features.worker_threads=1"], work / f"extract-run-{workers}")
        wall = time.perf_counter() - t0
        w = s["workers_stats"]
        out[workers] = {"studies": s["studies"], "parts": w["computed"], "compute_s": w["seconds"],
                        "studies_per_s": s["studies"] / w["seconds"], "startup_s": w["startup_s"],
                        "command_s": wall, "load_before": before, "load_after": load()}
    out["speedup"] = out[2]["studies_per_s"] / out[1]["studies_per_s"]
    import ray

    ray.shutdown()
    return out


def reader(args, work: Path) -> dict:
    """Raw reads (4 MiB at a time) and ``ShardReader`` (every field decoded) of the same shards, interleaved,
    ``--repeat`` times each after one warm-up pass (page cache): best and median of wall-clock and of
    this process's CPU time (the latter is what the load of other processes leaves untouched)."""
    from shards.reader import ShardReader

    shards = work / "paper-shards"
    manifest = load_manifest(str(shards))
    paths = [e["path"] for e in shard_entries(manifest, None)]
    total = sum(os.path.getsize(p) for p in paths)

    def raw() -> int:
        for p in paths:
            with open(p, "rb") as f:
                while f.read(1 << 22):
                    pass
        return len(manifest["shards"])

    def decoded() -> int:
        return sum(1 for _ in ShardReader(str(shards), split=None, fields=None, require=(), rank=0, world_size=1))

    runs = {"raw": raw, "reader": decoded}
    times: dict[str, list] = {name: [] for name in runs}
    before = load()
    for i in range(args.repeat + 1):
        for name, run in runs.items():
            w, c = time.perf_counter(), time.process_time()
            n = run()
            if i:  # the first pass warms the page cache
                times[name].append((time.perf_counter() - w, time.process_time() - c))
    out = {"bytes": total, "samples": n, "repeat": args.repeat, "load_before": before, "load": load()}
    for clock, k in (("wall", 0), ("cpu", 1)):
        for stat, pick in (("best", min), ("median", lambda v: sorted(v)[len(v) // 2])):
            mb = {name: total / pick([t[k] for t in v]) / 1e6 for name, v in times.items()}
            out[f"{clock}_{stat}"] = {"raw_mb_s": mb["raw"], "reader_mb_s": mb["reader"], "ratio": mb["reader"] / mb["raw"]}
    return out


SECTIONS = {"storage": storage, "probe": probe, "extract": extract, "reader": reader}


def markdown(res: dict) -> str:
    lines = [f"Command: `python scripts/bench_scale.py {' '.join(sys.argv[1:])}`", "",
             f"Machine: {os.cpu_count()} CPU cores shared with a benchmark run and other engineers: **every figure "
             "was taken under load** (load average beside it).", ""]
    if "storage" in res:
        s = res["storage"]
        v, fe, fs = s["volume_error"], s["feature_error_end_to_end"], s["feature_error_storage"]
        lines += ["## float16 storage", "",
                  f"{s['studies']} synthetic knee studies, sagittal 20x288x288 -> {s['volume_shape']} "
                  f"(OrthoDiffusion's preprocessing, [-1, 1]); features: OrthoDiffusion-size backbone (random init) "
                  f"t=200 `mid_0` {s['feature_shape']} of {s['feature_studies']} studies. {s['load']}", "",
                  "| array | max abs | mean abs | max rel | mean rel | max abs / std |", "|---|---|---|---|---|---|"]
        for name, e in (("volumes (float16 round trip)", v), ("features (float16 storage)", fs),
                        ("features (float16 volumes -> features -> float16)", fe)):
            lines.append(f"| {name} | {e['max_abs']:.3g} | {e['mean_abs']:.3g} | {e['max_rel']:.3g} | "
                         f"{e['mean_rel']:.3g} | {e['max_abs_over_std']:.3g} |")
        p = s["per_1000"]
        lines += ["", "| per 1,000 studies | float32 | float16 |", "|---|---|---|",
                  f"| preprocessed volumes, one plane 16x256x256 (from the format) | {p['float32']['volumes_gib_per_plane']:.2f} GiB | "
                  f"{p['float16']['volumes_gib_per_plane']:.2f} GiB |",
                  f"| three planes | {3 * p['float32']['volumes_gib_per_plane']:.2f} GiB | "
                  f"{3 * p['float16']['volumes_gib_per_plane']:.2f} GiB |",
                  f"| features, one plane, one block x timestep {s['feature_shape']} | "
                  f"{p['float32']['features_mib_per_plane_block']:.0f} MiB | {p['float16']['features_mib_per_plane_block']:.0f} MiB |",
                  f"| volumes entry measured ({s['studies']} studies, x 1000/{s['studies']}) | "
                  f"{s['measured_per_study']['float32'] * 1000 / 2**30:.2f} GiB | {s['measured_per_study']['float16'] * 1000 / 2**30:.2f} GiB |", ""]
    if "probe" in res:
        p = res["probe"]
        lines += ["## Probe AUROC, float32 vs float16 storage", "", f"{p['load']}", "", "```",
                  json.dumps({k: v for k, v in p.items() if k != "load"}, indent=1), "```", ""]
    if "extract" in res:
        e = res["extract"]
        lines += ["## Feature extraction on Ray workers (one torch thread each)", "",
                  "| workers | studies | parts | compute (s) | studies/s | actor start (s) | command (s) | load before -> after |",
                  "|---|---|---|---|---|---|---|---|"]
        for w in (1, 2):
            r = e[w]
            lines.append(f"| {w} | {r['studies']} | {r['parts']} | {r['compute_s']:.1f} | {r['studies_per_s']:.3f} | "
                         f"{r['startup_s']:.1f} | {r['command_s']:.1f} | {r['load_before'].split('load average:')[-1]} -> "
                         f"{r['load_after'].split('load average:')[-1]} |")
        lines += ["", f"Two workers / one: **{e['speedup']:.2f}x** (target >= 1.6x).", ""]
    if "reader" in res:
        r = res["reader"]
        lines += ["## Shard reader vs raw read (page cache)", "",
                  f"{r['samples']} samples, {r['bytes'] / 1e6:.1f} MB, {r['repeat']} interleaved passes each; "
                  f"load before: {r['load_before']}; after: {r['load']}", "",
                  "| clock | statistic | raw (MB/s) | ShardReader, every field decoded (MB/s) | reader / raw |",
                  "|---|---|---|---|---|"]
        for clock in ("wall", "cpu"):
            for stat in ("best", "median"):
                x = r[f"{clock}_{stat}"]
                lines.append(f"| {clock} | {stat} | {x['raw_mb_s']:.0f} | {x['reader_mb_s']:.0f} | "
                             f"**{100 * x['ratio']:.0f}%** |")
        lines += ["", "Target: reader >= 50% of raw.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/mskfm-bench-scale"))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--studies", type=int, default=8, help="patients of the storage sample")
    p.add_argument("--feature-studies", type=int, default=2)
    p.add_argument("--extract-patients", type=int, default=96)
    p.add_argument("--extract-shape", default="16,64,64")
    p.add_argument("--repeat", type=int, default=9)
    args = p.parse_args()
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    res = {}
    for name in args.sections.split(","):
        res[name] = SECTIONS[name](args, args.work)
        print(name, json.dumps(res[name], default=str), flush=True)
    text = markdown(res)
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
