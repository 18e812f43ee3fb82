"""Benchmark: a 16-trial frozen-backbone sweep vs one ``downstream finetune`` of the same task.

Both run as the CLI a user types, in fresh processes with cold feature caches, so each includes
its start-up and its feature extraction (the sweep extracts each swept feature setting once in
the driver; its trials read the cache). The task is knee-dx on one plane, head only (baselines
off, as in the sweep's trials). Target: sweep wall time <= 3x the single run on 2 CPUs.

    .venv/bin/python scripts/bench_sweep.py --shards data/shards/demo --out runs/bench/sweep
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def ensure_backbone(shards: str, hub: Path) -> str:
    """A small knee sagittal backbone like the demo's (channels 8, 16; 8x32x32; 1000-step schedule),
    made if missing (setup, not timed; one thread: two threads thrash on a shared 2-core machine)."""
    import torch

    from downstream.studies.config import StudyBackboneSpec
    from downstream.studies.pretrained import train_backbone

    path = hub / "knee-sag"
    if not (path / "config.json").is_file():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        train_backbone(shards, ["knee"], "sag", 0, str(path), run_root=hub / "pretrain",
                       spec=StudyBackboneSpec(channels=[8, 16], shape=[8, 32, 32], steps=20,
                                                 num_train_timesteps=1000))
        torch.set_num_threads(threads)
    return str(path)


def timed(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=fh, stderr=subprocess.STDOUT,
                       env=os.environ | {"PYTHONPATH": str(ROOT)})
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default="data/shards/demo")
    ap.add_argument("--out", default="runs/bench/sweep")
    ap.add_argument("--num-samples", type=int, default=8, help="per timestep setting (2 settings -> 16 trials)")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    backbone = ensure_backbone(str(Path(args.shards).resolve()), out / "hub")
    task = ["planes=[sag]", f"backbones.sag={backbone}", f"shards={Path(args.shards).resolve()}",
            "baselines.names=[]", "metrics.bootstrap=200"]
    py = [sys.executable, "-m", "downstream"]
    single = timed([*py, "finetune", "--task", "knee-dx", "--run-dir", str(out / "single"),
                    f"cache_dir={out / 'cache-single'}", *task], out / "single.log")
    sweep = timed([*py, "sweep", "--task", "knee-dx", "--space", "configs/sweeps/knee-dx-head.yaml",
                   "--run-dir", str(out / "sweep"), f"num_samples={args.num_samples}",
                   f"cache_dir={out / 'cache-sweep'}", *task], out / "sweep.log")
    summary = json.loads((out / "sweep" / "metrics.json").read_text())
    result = {"single_finetune_s": round(single, 1), "sweep_s": round(sweep, 1), "ratio": round(sweep / single, 2),
              "trials": summary["n_trials"], "trial_errors": summary["n_errors"],
              "sweep_prepare_s": summary["timings"]["prepare_s"], "cpus": os.cpu_count(),
              "load_average_1m": round(os.getloadavg()[0], 1), "best": summary["best"]["params"],
              "best_val_auroc": round(summary["best"]["value"], 3)}
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
