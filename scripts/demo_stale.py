"""Move aside demo outputs left by an older demo whose settings differ from today's configs.

A rerun resumes: the shard builder and ``pretrain run`` refuse a folder written with other settings
(naming the keys), and a pretraining run resumed with more steps would keep its old LR schedule.
So before the demo builds and pretrains, a shard folder or pretraining run of an older demo
config is renamed ``<folder>.old-<time>`` (kept, not deleted) and rebuilt. Same settings: untouched.

    python scripts/demo_stale.py --shards configs/shards/demo.yaml --out data/shards/demo \
        --pretrain configs/pretrain/demo-knee.yaml [--run-root runs/pretrain]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pretrain.config import PretrainConfig
from shards.build import RESUME_IGNORE, BuildConfig
from shards.config import ConfigError, load_config, to_dict
from shards.writer import check_resumable

PRETRAIN_KEYS = ("model", "schedule", "optim", "batch_size", "shape", "planes", "joint", "objective")


def move_aside(folder: Path, why: str) -> None:
    aside = folder.with_name(f"{folder.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    folder.rename(aside)
    print(f"  {folder} was written by an older demo ({why}): moved to {aside}")


def stale_shards(config: str, out: str) -> None:
    cfg = load_config(BuildConfig, config, [f"out={out}"])
    if not Path(out).is_dir():
        return
    try:
        check_resumable(out, "study", {"name": cfg.name, "source": "synth", "config": to_dict(cfg)},
                        ignore=RESUME_IGNORE)
    except ConfigError as exc:
        move_aside(Path(out), str(exc).split(" holds ")[-1][:200])


def stale_pretraining(config: str, run_root: str) -> None:
    new = to_dict(load_config(PretrainConfig, config))
    run = Path(run_root) / new["name"]
    if not (run / "config.yaml").is_file():
        return
    try:
        old = to_dict(load_config(PretrainConfig, run / "config.yaml"))
        changed = [k for k in PRETRAIN_KEYS if old.get(k) != new.get(k)]
    except ConfigError as exc:  # written by another version of the schema
        changed = [str(exc)]
    if changed:
        move_aside(run, f"other {', '.join(changed)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--pretrain", required=True)
    p.add_argument("--run-root", default="runs/pretrain")
    args = p.parse_args()
    stale_shards(args.shards, args.out)
    stale_pretraining(args.pretrain, args.run_root)


if __name__ == "__main__":
    main()
