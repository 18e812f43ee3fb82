"""Benchmark: the first and the second run of the same frozen-backbone task, in one process.

The first run preprocesses the volumes and extracts the backbone features (cache misses); the second
finds both in the on-disk cache. Baselines are left out by default (they train on volumes every run,
so they are not what the cache speeds up); pass ``baselines.names=[...]`` to include them.

    python scripts/bench_downstream_cache.py --task knee-dx [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from downstream.finetune import run_finetune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="knee-dx")
    parser.add_argument("--keep-cache", action="store_true", help="reuse an existing cache_dir (no cold run)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-downstream-"))
    overrides = [f"cache_dir={tmp / 'cache'}", f"out={tmp / 'runs'}", "baselines.names=[]", *args.overrides]
    timings = []
    for i in range(2):
        t0 = time.perf_counter()
        res = run_finetune(args.task, overrides, run_dir=tmp / f"run{i + 1}")
        timings.append({"wall_s": round(time.perf_counter() - t0, 2), "features_s": res["timings"]["features_s"],
                        "cache": res["cache"], "n_studies": res["n_train"] + res["n_eval"]})
    speedup = timings[0]["wall_s"] / timings[1]["wall_s"]
    feat_speedup = timings[0]["features_s"] / max(timings[1]["features_s"], 1e-9)
    out = {"task": args.task, "overrides": args.overrides, "first": timings[0], "second": timings[1],
           "speedup_total": round(speedup, 1), "speedup_features": round(feat_speedup, 1),
           "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
           "cuda": torch.cuda.is_available()}
    print(json.dumps(out, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
