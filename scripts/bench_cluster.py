"""Cluster overheads and tiny two-node pretraining throughput on this machine (loopback, CPU).

Measures: `cluster up` / `cluster submit` of a no-op job / `cluster down` wall times on a loopback
head, and the tiny pretraining config run as a Ray job on (a) one node with 2 workers and (b) two
nodes with 1 worker each (scripts/two_node_local.py), reading samples/s from each run's
metrics.jsonl. Prints a markdown table.

usage: python scripts/bench_cluster.py --shards data/shards/tiny [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return time.monotonic() - t0, proc


def samples_per_s(run_dir: Path) -> float:
    recs = [json.loads(x) for x in (run_dir / "sag" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in recs if "samples_per_s" in r][1:]  # skip the warm-up step
    return statistics.median(rates)


def pretrain_args(shards: str, tmp: Path, name: str, steps: int) -> list[str]:
    return ["--config", str(ROOT / "configs/pretrain/tiny.yaml"), f"data.source={shards}",
            f"run_root={tmp}/runs", f"storage_path={tmp}/ckpt", f"name={name}", "launcher=ray",
            "ray.num_workers=2", "ray.cpus_per_worker=1", f"optim.total_steps={steps}",
            f"checkpoint_every={steps}", "log_every=1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True)
    parser.add_argument("--steps", type=int, default=8)
    opts = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    cli = [sys.executable, "-m", "cluster"]
    state = [f"state_dir={tmp}/state", "num_cpus=2"]
    rows = []
    t_up, _ = timed(cli + ["up", *state])
    rows.append(("`cluster up` (loopback head, dashboard, token auth)", t_up))
    try:
        t_job, _ = timed(cli + ["submit", *state, "--", "python", "-c", "pass"])
        rows.append(("`cluster submit -- python -c pass` (upload, run, exit code)", t_job))
        t_one, _ = timed(cli + ["submit", *state, "--", "pretrain", "run",
                                *pretrain_args(opts.shards, tmp, "one-node", opts.steps)])
    finally:
        t_down, _ = timed(cli + ["down", *state])
    rows.append(("`cluster down`", t_down))
    t_two, _ = timed([sys.executable, str(ROOT / "scripts/two_node_local.py"), "--",
                      *pretrain_args(opts.shards, tmp, "two-node", opts.steps)])
    one, two = samples_per_s(tmp / "runs/one-node"), samples_per_s(tmp / "runs/two-node")
    print("| what | wall s |\n|---|---|")
    for what, t in rows:
        print(f"| {what} | {t:.1f} |")
    print(f"\n| tiny pretraining, {opts.steps} steps, 2 DeepSpeed workers | samples/s (median) | job wall s |")
    print("|---|---|---|")
    print(f"| one node, 2 workers | {one:.2f} | {t_one:.1f} |")
    print(f"| two nodes, 1 worker each | {two:.2f} | {t_two:.1f} |")


if __name__ == "__main__":
    main()
