"""Pretraining step benchmark: plain PyTorch vs the platform's DeepSpeed step, locally and on Ray.

CPU (default), one run, same model / batch / data pipeline:
  (a) plain PyTorch step: model + AdamW + grad clipping over the platform's DataLoader (the floor)
  (b) `pretrain run launcher=local` (DeepSpeed ZeRO, EMA, logging; a subprocess)
  (c) `pretrain run launcher=ray` with ray.num_workers=1 and 2 (fresh local Ray each; subprocess)
Reports samples/s after warm-up, the overhead ratio vs (a), time from command start to the first
step, and the data-wait fraction; writes a markdown table (``--out``).

    python scripts/bench_pretrain.py --shards data/shards/demo --out docs/perf/pretrain.md

GPU variant (``--gpu``, :mod:`gpu_bench` beside this file): OrthoDiffusion's 34.5M-parameter U-Net at
16x256x256 in one process, fp32 eager vs bf16, channels-last 3D, torch.compile, flash attention;
samples/s, voxels/s, data wait, peak memory, MFU. No Ray, no DeepSpeed (``scripts/gpu_bench_bundle.sh``
for a bare torch machine)::

    python scripts/bench_pretrain.py --gpu --steps 20 --warmup 5 --out docs/perf/pretrain-gpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_bench  # noqa: E402  (beside this file; imports only torch at module level)

# CPU benchmark model: the demo U-Net at 8x32x32 (see configs/pretrain/demo-knee.yaml)
CPU_OVERRIDES = ["planes=[sag]", "ray.max_failures=0", "log_every=1", "data.num_workers=1",
                 "ray.cpus_per_worker=1", "ray.concurrent_planes=false"]
# One intra-op thread per training process in every variant (Ray sets OMP_NUM_THREADS to a
# worker's CPUs): the comparison is then of the step, not of thread oversubscription.
THREADS = 1


def plain_step_rate(cfg, steps: int, warmup: int) -> dict:
    """(a): the floor. Same objective, model, batch and DataLoader; no DeepSpeed, no EMA."""
    from pretrain.loop import build_loader
    from pretrain.objectives import build_objective
    from shards.manifest import load_manifest

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(THREADS)
    objective = build_objective(cfg, cfg.planes[0], load_manifest(cfg.data.source))
    model = objective.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    gen = torch.Generator().manual_seed(0)
    batches = iter(build_loader(cfg, objective, 0, 1, epoch=0))
    wait = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            t_start, wait = time.perf_counter(), 0.0
        t0 = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t0
        loss = objective.loss(model, batch, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip)
        opt.step()
    wall = time.perf_counter() - t_start
    return {"samples_per_s": steps * cfg.batch_size / wall, "data_wait_frac": wait / wall,
            "first_step_s": None}


def platform_rate(config: str, shards: str, work: Path, tag: str, steps: int, warmup: int,
                  extra: list[str]) -> dict:
    """(b)/(c): the real `pretrain run` command; figures from its metrics.jsonl."""
    name = f"bench-{tag}"
    cmd = [sys.executable, "-m", "pretrain", "run", "--config", config, f"data.source={shards}",
           f"run_root={work}/runs", f"storage_path={work}/ckpt", f"name={name}",
           f"optim.total_steps={warmup + steps}", f"checkpoint_every={warmup + steps}",
           *CPU_OVERRIDES, *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0",
           "OMP_NUM_THREADS": str(THREADS)}
    start = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, start_new_session=True)
    total = time.time() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{tag} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    recs = [json.loads(line) for line in (work / "runs" / name / "sag" / "metrics.jsonl").read_text().splitlines()]
    steps_recs = [r for r in recs if "loss" in r and "event" not in r]
    timed = [r for r in steps_recs if r["step"] > warmup]
    step_time = sum(r["step_s"] for r in timed)  # one record per step (log_every=1)
    return {"samples_per_s": sum(r["samples_per_s"] * r["step_s"] for r in timed) / step_time,
            "data_wait_frac": sum(r["data_wait_frac"] * r["step_s"] for r in timed) / step_time,
            "first_step_s": steps_recs[0]["time"] - start, "command_s": total}


def plain_in_subprocess(args) -> dict:
    """Run (a) as its own process and session, like the platform commands: on a shared machine the
    kernel shares CPU time per session (autogroup), so every variant must get its own."""
    cmd = [sys.executable, __file__, "--plain-only", "--config", args.config, "--shards", args.shards,
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, start_new_session=True)
    if proc.returncode != 0:
        raise RuntimeError(f"plain step failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plain_config(args):
    from pretrain.config import PretrainConfig
    from pretrain.run import resolve_paths
    from shards.config import load_config

    return resolve_paths(load_config(PretrainConfig, args.config, [f"data.source={args.shards}", *CPU_OVERRIDES]))


def cpu_bench(args) -> list[tuple[str, dict]]:
    cfg = plain_config(args)
    rows = [("(a) plain PyTorch step", plain_in_subprocess(args))]
    with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as tmp:
        work = Path(tmp)
        rows.append(("(b) platform, launcher=local", platform_rate(
            args.config, cfg.data.source, work, "local", args.steps, args.warmup, ["launcher=local"])))
        for n in (1, 2):
            rows.append((f"(c) platform, Ray Train, {n} worker{'s' * (n > 1)}", platform_rate(
                args.config, cfg.data.source, work, f"ray{n}", args.steps, args.warmup,
                ["launcher=ray", f"ray.num_workers={n}"])))
    return rows


def write_markdown(rows, args, path: Path) -> str:
    floor = rows[0][1]["samples_per_s"]
    lines = [f"Command: `python scripts/{Path(__file__).name} {' '.join(sys.argv[1:])}`", "",
             f"Machine: {os.cpu_count()} CPU cores, torch {torch.__version__}; {args.steps} timed steps "
             f"after {args.warmup} warm-up steps; {THREADS} torch thread per training process; "
             f"load average at start {os.getloadavg()[0]:.1f}.", ""]
    lines += ["| variant | samples/s | vs plain | command start -> first step (s) | data wait |",
              "|---|---|---|---|---|"]
    for n, r in rows:
        first = f"{r['first_step_s']:.1f}" if r.get("first_step_s") else "n/a"
        lines.append(f"| {n} | {r['samples_per_s']:.2f} | {r['samples_per_s'] / floor:.2f}x | {first} | "
                     f"{100 * r['data_wait_frac']:.1f}% |")
    text = "\n".join(lines) + "\n"
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "pretrain" / "demo-knee.yaml"))
    p.add_argument("--shards", default="data/shards/demo")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--gpu", action="store_true", help="the GPU benchmark at the paper size (scripts/gpu_bench.py)")
    p.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    p.add_argument("--plain-only", action="store_true", help=argparse.SUPPRESS)
    gpu_bench.add_arguments(p)
    args = p.parse_args()
    if args.gpu:
        text = gpu_bench.main(args)
        print(text)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(f"Command: `python scripts/{Path(__file__).name} {' '.join(sys.argv[1:])}`\n\n{text}")
        return
    if args.plain_only:
        print(json.dumps(plain_step_rate(plain_config(args), args.steps, args.warmup)))
        return
    rows = gpu_bench(args) if args.gpu else cpu_bench(args)
    for name, r in rows:
        print(name, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}))
    print(write_markdown(rows, args, args.out))


if __name__ == "__main__":
    main()
