"""Move aside a pretraining run left by an older demo whose training settings differ from the config.

Rerunning ``pretrain run`` under the same name resumes the old run with its own LR schedule and
step count, so a changed demo config would not take effect. The old run is kept, renamed.

    python scripts/demo_stale_run.py configs/pretrain/demo-knee.yaml [--run-root runs/pretrain]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pretrain.config import PretrainConfig
from shards.config import ConfigError, load_config, to_dict

KEYS = ("model", "schedule", "optim", "batch_size", "shape", "planes", "joint")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--run-root", default="runs/pretrain")
    args = p.parse_args()
    new = to_dict(load_config(PretrainConfig, args.config))
    run = Path(args.run_root) / new["name"]
    if not (run / "config.yaml").is_file():
        return
    try:
        old = to_dict(load_config(PretrainConfig, run / "config.yaml"))
        changed = [k for k in KEYS if old.get(k) != new.get(k)]
    except ConfigError as exc:  # written by another version of the schema
        changed = [str(exc)]
    if changed:
        aside = run.with_name(f"{run.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        run.rename(aside)
        print(f"  the pretraining run {run} has other settings ({', '.join(changed)}): moved to {aside}")


if __name__ == "__main__":
    main()
