"""``launcher=torchrun``: processes started by ``torchrun`` (or any launcher that sets RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT); each runs the planes one after another. Checkpoints go to
``storage_path`` through :class:`~pretrain.launchers.local.FileSession`, so it must be shared by
the nodes (a shared folder or an ``s3://`` URL)."""

from __future__ import annotations

import os

from ..config import PretrainConfig
from .local import FileSession

REQUIRED_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_torchrun(cfg: PretrainConfig) -> dict:
    missing = [k for k in REQUIRED_ENV if k not in os.environ]
    if missing:
        raise RuntimeError(f"launcher=torchrun needs {', '.join(missing)} in the environment: start it with "
                           "`torchrun --nproc_per_node=N -m pretrain run ... launcher=torchrun`")
    from ..loop import train_unit

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return {unit: train_unit(cfg, unit, FileSession(cfg, unit, rank, world)) for unit in cfg.planes}
