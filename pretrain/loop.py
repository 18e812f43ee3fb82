"""The one training loop, used by every launcher (local process, torchrun, Ray Train worker).

``train_unit(cfg, unit, session)`` trains one backbone (``unit`` = a plane) under DeepSpeed:
ZeRO stage 0/1/2, bf16 where supported, gradient accumulation and clipping, warm-up + cosine LR
(DeepSpeed ``WarmupCosineLR``), an fp32 EMA of the weights (diffusers ``EMAModel``, rank 0).
Data: the plane's volumes from the shards, resampled with a seeded shuffle per (rank, DataLoader
worker); several anatomies are mixed with their weights (:class:`shards.reader.MixedReader`). The session (see :mod:`pretrain.launchers`) supplies rank, world size, the checkpoint to
resume from and where checkpoints go. DeepSpeed is imported here, inside the worker, after
``DS_ACCELERATOR`` is set.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from shards.config import to_dict
from shards.manifest import load_manifest
from shards.reader import MixedReader, ShardError, ShardReader
from shards.tracking import Tracker, start_tracking

from .checkpoint import load_checkpoint, save_checkpoint
from .config import PretrainConfig, run_dir
from .objectives import build_objective


class NonFiniteLossError(FloatingPointError):
    """A NaN/inf loss: the run stops (no checkpoint is written after it)."""


def use_bf16(cfg: PretrainConfig) -> bool:
    if cfg.precision == "bf16":
        return True
    return cfg.precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def deepspeed_config(cfg: PretrainConfig) -> dict:
    """The DeepSpeed config dict, made from the run config (never a second config file)."""
    o = cfg.optim
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": o.grad_accum,
        "gradient_clipping": o.clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,  # a plain torch AdamW (DeepSpeed's CPU Adam needs a build)
        "bf16": {"enabled": use_bf16(cfg)},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": o.total_steps, "warmup_num_steps": max(1, o.warmup_steps),
            "warmup_type": "linear", "warmup_min_ratio": 0.0, "cos_min_ratio": o.min_lr_ratio}},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _skip_cpu_shm_op(deepspeed) -> None:
    """Use gloo's allreduce on CPU instead of DeepSpeed's shared-memory op.

    DeepSpeed JIT-compiles that op in every new process whose probed SIMD flags differ from the
    cached build (55-95 s each here), after probing every op with compiler subprocesses. Its
    only gate is ``deepspeed.ops.__compatible_ops__``; presetting it skips probe and build.
    """
    deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}


def build_engine(cfg: PretrainConfig, model: torch.nn.Module):
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed

    if not torch.cuda.is_available():
        _skip_cpu_shm_op(deepspeed)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    o = cfg.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas),
                                  weight_decay=o.weight_decay)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                   config=deepspeed_config(cfg))
    return engine, scheduler


def build_ema(cfg: PretrainConfig, model: torch.nn.Module, rank: int):
    if rank != 0 or cfg.ema_decay <= 0:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel([p.detach().float().clone() for p in model.parameters()],
                    decay=cfg.ema_decay, foreach=True)


def build_loader(cfg: PretrainConfig, objective, rank: int, world: int, epoch: int):
    """Endless seeded batches of this rank's share; ``epoch`` (the start step) reseeds on resume."""
    kwargs = {"source": cfg.data.source, **objective.reader_kwargs()}
    source = kwargs.pop("source")

    def reader(**extra) -> ShardReader:
        return ShardReader(source, cfg.data.split, rank=rank, world_size=world, shuffle=True, seed=cfg.seed,
                           shuffle_buffer=cfg.data.shuffle_buffer, resample=True, transform=objective.prepare,
                           **{**kwargs, **extra})

    mix = getattr(objective, "mixture", None) or {}
    if len(mix) > 1:  # one stream per anatomy, drawn with the mixing weights
        keys = kwargs.get("keys")
        data = MixedReader([reader(joints=[j], keys=keys) for j in mix], list(mix.values()), seed=cfg.seed)
    else:
        data = reader()
    data.set_epoch(epoch)
    extra = ({"prefetch_factor": cfg.data.prefetch, "persistent_workers": False}
             if cfg.data.num_workers > 0 else {})
    return torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, num_workers=cfg.data.num_workers,
                                       collate_fn=objective.collate, **extra)


def _next_batch(batches):
    try:
        return next(batches)
    except ShardError as exc:  # from a DataLoader worker, the message carries its traceback
        raise ShardError(str(exc).strip().splitlines()[-1].split("ShardError: ", 1)[-1]) from None


def _to_engine(batch: dict, device, dtype) -> dict:
    return {k: (v.to(device, dtype if v.is_floating_point() else None) if torch.is_tensor(v) else v)
            for k, v in batch.items()}


class MetricsLog:
    """Rank-0 log: ``metrics.jsonl`` (one line per logged step or event), printed lines, and the
    W&B run when ``wandb.project`` is set."""

    def __init__(self, folder: Path, enabled: bool, tracker: Tracker | None = None):
        self.enabled = enabled
        self.path = folder / "metrics.jsonl"
        self.tracker = tracker or Tracker()
        if enabled:
            folder.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict, show: bool = True) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")
        if "loss" in record:
            self.tracker.log(record, step=record["step"])
        if show:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in record.items()), flush=True)


class Window:
    """Accumulates loss, step and data-wait time between two log lines."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.losses, self.data_s, self.t0, self.steps = [], 0.0, time.perf_counter(), 0

    def summary(self, samples_per_step: int) -> dict:
        wall = max(time.perf_counter() - self.t0, 1e-9)
        return {"loss": sum(self.losses) / max(1, len(self.losses)),
                "samples_per_s": self.steps * samples_per_step / wall,
                "data_wait_frac": self.data_s / wall, "step_s": wall / max(1, self.steps)}


def _mean_over_ranks(value: float, world: int) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.item() / world


def _write_pid(folder: Path, rank: int) -> None:
    pids = folder / "pids"
    pids.mkdir(parents=True, exist_ok=True)
    (pids / f"rank{rank}.pid").write_text(str(os.getpid()))


def train_unit(cfg: PretrainConfig, unit: str, session) -> dict:
    """Train ``unit`` to ``cfg.optim.total_steps`` (resuming if the session has a checkpoint)."""
    rank = session.rank
    folder = run_dir(cfg, unit)
    _write_pid(folder, rank)
    torch.manual_seed(cfg.seed)
    objective = build_objective(cfg, unit, load_manifest(cfg.data.source))
    engine, lr_sched = build_engine(cfg, objective.build_model())
    ema = build_ema(cfg, engine.module, rank)
    tracker = (start_tracking(cfg.wandb, folder, f"{cfg.name}-{unit}", to_dict(cfg), group=cfg.name, job_type="pretrain")
               if rank == 0 else Tracker())
    with tracker:
        return _train(cfg, unit, session, objective, engine, lr_sched, ema, MetricsLog(folder, rank == 0, tracker))


def _train(cfg: PretrainConfig, unit: str, session, objective, engine, lr_sched, ema, log: MetricsLog) -> dict:
    rank, world = session.rank, session.world_size
    step, history = 0, []
    with session.latest_checkpoint() as ckpt:
        if ckpt is not None:
            state = load_checkpoint(engine, ema, ckpt)
            step, history = state["step"], state.get("history", [])
            log.write({"event": "resume", "step": step, "checkpoint": str(ckpt), "world_size": world})
    if step == 0:
        log.write({"event": "start", "step": 0, "world_size": world, "unit": unit,
                   "params": sum(p.numel() for p in engine.module.parameters())})
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rank * 7919 + step)
    batches = iter(build_loader(cfg, objective, rank, world, epoch=step))
    samples_per_step = cfg.batch_size * cfg.optim.grad_accum * world
    window, total = Window(), cfg.optim.total_steps
    while step < total:
        for _ in range(cfg.optim.grad_accum):
            t0 = time.perf_counter()
            batch = _next_batch(batches)
            window.data_s += time.perf_counter() - t0
            loss = objective.loss(engine, _to_engine(batch, engine.device, dtype), gen)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"{unit}: non-finite loss {loss.item()} at step {step + 1} "
                                         f"(rank {rank}); samples: {', '.join(batch['keys'])}")
            engine.backward(loss)
            engine.step()
            window.losses.append(loss.item())
        step += 1
        window.steps += 1
        if ema is not None:
            ema.step(engine.module.parameters())
        if step % cfg.log_every == 0 or step == total:
            record = {"step": step, **window.summary(samples_per_step), "lr": lr_sched.get_last_lr()[0]}
            record["loss"] = _mean_over_ranks(record["loss"], world)
            history.append({"step": step, "loss": record["loss"]})
            log.write(record)
            window.reset()
        if step % cfg.checkpoint_every == 0 or step == total:
            t0 = time.perf_counter()
            _checkpoint(cfg, engine, ema, session, step, history, unit)
            window.t0 += time.perf_counter() - t0  # checkpoint time is not step time
    final = {"steps": step, "final_loss": history[-1]["loss"] if history else math.nan,
             "unit": unit, "world_size": world}
    log.write({"event": "done", **final})
    log.tracker.summary(final)
    return final


def _checkpoint(cfg, engine, ema, session, step: int, history: list, unit: str) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f"mskfm-ckpt-{unit}-{step}-"))
    try:
        state = {"step": step, "seed": cfg.seed, "unit": unit, "history": history[-1000:]}
        save_checkpoint(engine, ema, state, staging)
        metrics = {"step": step, "loss": history[-1]["loss"] if history else math.nan}
        session.report(metrics, staging, step)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
