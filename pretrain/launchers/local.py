"""``launcher=local``: one process, the planes one after another; checkpoints as plain folders.

:class:`FileSession` is also the session of ``launcher=torchrun``: every rank copies its part of a
checkpoint to ``<storage_path>/<name>/<plane>/checkpoint_<step>/`` (a local folder or any fsspec
URL such as ``s3://``); rank 0 writes ``loop_state.json`` last, which marks the checkpoint complete.
"""

from __future__ import annotations

import logging
import os
import posixpath
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem
import torch

from ..checkpoint import LOOP_STATE, CheckpointError
from ..config import PretrainConfig, storage_root

log = logging.getLogger(__name__)
PREFIX = "checkpoint_"


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


class FileSession:
    def __init__(self, cfg: PretrainConfig, unit: str, rank: int, world_size: int):
        self.rank, self.world_size, self.keep = rank, world_size, cfg.keep_checkpoints
        self.fs, self.root = fsspec.core.url_to_fs(f"{storage_root(cfg)}/{unit}")

    def _checkpoints(self) -> list[tuple[int, str]]:
        if not self.fs.exists(self.root):
            return []
        found = []
        for path in self.fs.ls(self.root, detail=False):
            name = posixpath.basename(path.rstrip("/"))
            if name.startswith(PREFIX) and name[len(PREFIX):].isdigit():
                found.append((int(name[len(PREFIX):]), path))
        return sorted(found)

    def latest(self) -> str | None:
        """Newest complete checkpoint; an interrupted save (no loop_state.json) is passed over loudly."""
        for _, path in reversed(self._checkpoints()):
            if self.fs.exists(posixpath.join(path, LOOP_STATE)):
                return path
            log.warning("ignoring incomplete checkpoint %s (no %s: its save was interrupted)", path, LOOP_STATE)
        return None

    @contextmanager
    def latest_checkpoint(self):
        path = self.latest()
        if path is None or isinstance(self.fs, LocalFileSystem):
            yield path
            return
        with tempfile.TemporaryDirectory(prefix="mskfm-restore-") as tmp:
            try:
                self.fs.get(path.rstrip("/") + "/", tmp, recursive=True)
            except Exception as exc:
                raise CheckpointError(f"corrupt checkpoint {path}: cannot download it: {exc}") from exc
            yield tmp

    def report(self, metrics: dict, staging: Path, step: int) -> None:
        dest = posixpath.join(self.root, f"{PREFIX}{step:08d}")
        for f in sorted(p for p in Path(staging).rglob("*") if p.is_file() and p.name != LOOP_STATE):
            target = posixpath.join(dest, f.relative_to(staging).as_posix())
            self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
            self.fs.put_file(str(f), target)
        _barrier(self.world_size)
        if self.rank == 0:
            self.fs.put_file(str(Path(staging) / LOOP_STATE), posixpath.join(dest, LOOP_STATE))
            for _, old in self._checkpoints()[:-self.keep]:
                self.fs.rm(old, recursive=True)
        _barrier(self.world_size)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local(cfg: PretrainConfig) -> dict:
    from ..loop import train_unit

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}.items():
        os.environ.setdefault(key, value)
    return {unit: train_unit(cfg, unit, FileSession(cfg, unit, 0, 1)) for unit in cfg.planes}
