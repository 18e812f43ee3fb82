"""``shards build``: synthetic studies → schema-v2 WebDataset shards (+ recon shards), resumably."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from tqdm import tqdm

from .config import ConfigError, to_dict
from .schema import validate_study
from .splits import assign_split
from .synth import SynthConfig, generate_study, iter_study_refs
from .synth.vocab import synth_declaration
from .writer import ShardWriter

log = logging.getLogger(__name__)
# keys that may change when a build is resumed (everything else must match the folder's shards)
RESUME_IGNORE = ("config.workers", "config.out", "dataset")  # dataset: derived from config.synth (v1 folders have none)


@dataclass
class BuildConfig:
    name: str = "demo"
    out: str = "data/shards/demo"
    synth: SynthConfig = field(default_factory=SynthConfig)
    splits: dict[str, float] = field(default_factory=lambda: {"train": 0.7, "val": 0.15, "test": 0.15})
    split_seed: int = 0
    shard_max_bytes: int = 1_000_000_000   # ~1 GB shards for real data; tests use tiny ones
    shard_max_count: int = 10_000
    workers: int = 1                       # processes generating studies (order is preserved)

    def validate(self) -> None:
        self.synth.validate()
        if any(v < 0 for v in self.splits.values()) or sum(self.splits.values()) <= 0:
            raise ConfigError(f"splits must be non-negative with a positive sum, got {self.splits}")
        if self.shard_max_bytes <= 0 or self.shard_max_count <= 0:
            raise ConfigError("shard_max_bytes and shard_max_count must be positive")


def _generate(args):
    cfg, plan, visit, key = args
    sample, recon = generate_study(cfg, plan, visit, key)
    validate_study(sample, synth_declaration(cfg.joints))
    return plan, sample, recon


def build_shards(cfg: BuildConfig, progress: bool = True) -> dict:
    """Write (or finish writing) the shards described by ``cfg``; returns the study manifest."""
    out = Path(cfg.out)
    info = {"name": cfg.name, "source": "synth", "config": to_dict(cfg),
            "dataset": synth_declaration(cfg.synth.joints).to_dict()}
    kw = dict(max_bytes=cfg.shard_max_bytes, max_count=cfg.shard_max_count, info=info,
              resume_ignore=RESUME_IGNORE)
    t0 = time.time()
    studies = ShardWriter(out, kind="study", **kw)
    recon = None
    try:
        recon = ShardWriter(out / "recon", kind="recon", **kw) if cfg.synth.kspace.enabled else None
        todo = _write_all(cfg, studies, recon, progress)
    except BaseException as exc:  # finished shards stay for the rerun; locks are dropped
        for writer in (studies, recon):
            if writer is not None:
                writer.__exit__(type(exc), exc, exc.__traceback__)
        raise
    if recon is not None:
        recon.close()
    manifest = studies.close()
    manifest["build_seconds"] = round(time.time() - t0, 2)
    manifest["generated"] = todo
    return manifest


def _write_all(cfg: BuildConfig, studies: ShardWriter, recon: ShardWriter | None, progress: bool) -> int:
    """Generate and write every study (and its recon slices) not yet in a finished shard."""
    recon_done = {k.rsplit("-", 1)[0] for k in recon.done_keys} if recon else set()
    refs = list(iter_study_refs(cfg.synth))
    todo = [(cfg.synth, plan, v, key) for plan, v, key in refs
            if not studies.done(key) or (recon is not None and key not in recon_done)]
    if studies.resumed_samples:
        log.info("resuming %s: %d studies already in finished shards", cfg.out, studies.resumed_samples)
    with _pool(cfg.workers) as pool:
        results = pool.imap(_generate, todo, chunksize=2) if pool else map(_generate, todo)
        for plan, sample, recon_slices in tqdm(results, total=len(todo), disable=not progress,
                                               desc=f"shards {cfg.name}", unit="study"):
            split = assign_split(plan.key, cfg.splits, cfg.split_seed)
            sample["meta"]["split"] = split
            studies.write(sample, split)
            for r in recon_slices if recon is not None else ():
                r["meta"]["split"] = split
                recon.write(r, split)
    return len(todo)


class _pool:
    """A process pool when ``workers > 1``, else nothing (inline generation)."""

    def __init__(self, workers: int):
        self.pool = get_context("spawn").Pool(workers) if workers > 1 else None

    def __enter__(self):
        return self.pool

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate()
