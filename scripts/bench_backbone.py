"""Time the diffusion backbone: one DDPM training step (forward + backward) and features() extraction.

    python scripts/bench_backbone.py --channels 16 32 64 --shape 16 64 64 --batch 2 --repeats 3

Prints one JSON line per measurement (median seconds over ``--repeats`` after one warm-up).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from pretrain.models import DiffusionBackbone
from pretrain.schedule import build_scheduler, training_target


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--shape", type=int, nargs=3, default=[16, 64, 64])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    levels = len(args.channels)
    model = DiffusionBackbone(channels=tuple(args.channels), attention_levels=(False,) * (levels - 1) + (True,),
                              num_res_blocks=1, num_head_channels=min(args.channels[-1], 32),
                              norm_num_groups=min(8, args.channels[0])).to(args.device)
    sched = build_scheduler()
    x0 = torch.randn(args.batch, 1, *args.shape, device=args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (args.batch,), device=args.device)
        loss = F.mse_loss(model(sched.add_noise(x0, noise, t), t), training_target(sched, x0, noise, t))
        opt.zero_grad()
        loss.backward()
        opt.step()

    def extract(blocks):
        with torch.no_grad():
            model.features(x0, [100], blocks)

    info = {"device": args.device, "threads": torch.get_num_threads(), "channels": args.channels,
            "shape": args.shape, "batch": args.batch,
            "params": sum(p.numel() for p in model.parameters())}
    rows = [("train_step", train_step), ("features_all_blocks", lambda: extract(None)),
            ("features_encoder_only", lambda: extract([f"down.{levels - 1}", "mid"]))]
    for name, fn in rows:
        sec = timed(fn, args.repeats)
        print(json.dumps(info | {"what": name, "median_s": round(sec, 4),
                                 "volumes_per_s": round(args.batch / sec, 2)}))


if __name__ == "__main__":
    main()
