"""Checkpoints of the training loop: DeepSpeed engine state + EMA + a small JSON of loop state.

A checkpoint is one folder (one per saved step) holding, under tag ``state/``, DeepSpeed's model
states and each rank's ZeRO optimizer partition, plus ``ema.pt`` (rank 0) and ``loop_state.json``
(step, seed, metrics and the sha256 of every file of every rank). Each rank first writes its files
into its own staging folder; the launcher's session then makes them durable (Ray Train merges the
ranks' folders in ``storage_path``; the file session copies them). ``loop_state.json`` lists every
file, so a damaged or incomplete checkpoint is refused with its path instead of being skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from shards.config import UserError

TAG = "state"
LOOP_STATE = "loop_state.json"
EMA_FILE = "ema.pt"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message names its path."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _file_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): _sha256(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOOP_STATE}


def _gather(obj, world_size: int) -> list:
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def save_checkpoint(engine, ema, loop_state: dict, staging: str | Path) -> Path:
    """Write this rank's part of a checkpoint into ``staging``; every rank must call it.

    Rank 0 also writes the EMA weights and ``loop_state.json`` (with all ranks' file hashes).
    """
    staging = Path(staging)
    staging.mkdir(parents=True, exist_ok=True)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    engine.save_checkpoint(str(staging), tag=TAG, save_latest=False)
    if rank == 0 and ema is not None:
        torch.save(ema.state_dict(), staging / EMA_FILE)
    files: dict[str, str] = {}
    for part in _gather(_file_hashes(staging), world):
        files.update(part)
    if rank == 0:
        state = {**loop_state, "files": files, "world_size": world}
        tmp = staging / (LOOP_STATE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
        os.replace(tmp, staging / LOOP_STATE)
    return staging


def read_loop_state(folder: str | Path, verify: bool = True) -> dict:
    """``loop_state.json`` of a checkpoint folder; with ``verify``, check every listed file."""
    folder = Path(folder)
    path = folder / LOOP_STATE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"corrupt checkpoint {folder}: {LOOP_STATE} is missing") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"corrupt checkpoint {folder}: cannot read {path}: {exc}") from exc
    if verify:
        for name, digest in sorted(state.get("files", {}).items()):
            f = folder / name
            if not f.is_file():
                raise CheckpointError(f"corrupt checkpoint {folder}: file {f} is missing")
            if _sha256(f) != digest:
                raise CheckpointError(f"corrupt checkpoint {folder}: file {f} does not match "
                                      "the sha256 recorded when it was saved")
    return state


def load_checkpoint(engine, ema, folder: str | Path) -> dict:
    """Restore engine (module, optimizer, LR schedule) and EMA from ``folder``; return loop state."""
    folder = Path(folder)
    state = read_loop_state(folder)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if state.get("world_size", world) != world:
        raise CheckpointError(f"checkpoint {folder} was saved by {state['world_size']} workers; "
                              f"this run has {world} (ZeRO partitions are per worker)")
    try:
        path, _ = engine.load_checkpoint(str(folder), tag=TAG, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    except Exception as exc:
        raise CheckpointError(f"corrupt checkpoint {folder}: DeepSpeed cannot load it: "
                              f"{type(exc).__name__}: {exc}") from exc
    if path is None:
        raise CheckpointError(f"corrupt checkpoint {folder}: DeepSpeed found no state under tag '{TAG}'")
    if ema is not None:
        ema_file = folder / EMA_FILE
        if not ema_file.is_file():
            raise CheckpointError(f"corrupt checkpoint {folder}: {ema_file} is missing")
        ema.load_state_dict(torch.load(ema_file, map_location="cpu", weights_only=False))
    return state


def consolidated_state_dict(folder: str | Path, prefer_ema: bool = True) -> tuple[dict, str, dict]:
    """Full fp32 weights of a checkpoint (ZeRO partitions merged with DeepSpeed's zero_to_fp32).

    Returns ``(weights, source, loop_state)``; source is ``"ema"`` when the EMA state is included
    (under the key ``"__ema__"``; :func:`apply_weights` applies it), else ``"zero"``/``"module"``.
    """
    folder = Path(folder)
    state = read_loop_state(folder)
    try:
        if (folder / TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file():
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            weights, source = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=TAG), "zero"
        else:
            blob = torch.load(folder / TAG / "mp_rank_00_model_states.pt", map_location="cpu",
                              weights_only=False)
            weights, source = {k: v.float() for k, v in blob["module"].items()}, "module"
        if prefer_ema and (folder / EMA_FILE).is_file():
            ema = torch.load(folder / EMA_FILE, map_location="cpu", weights_only=False)
            weights, source = {**weights, "__ema__": ema}, "ema"
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"corrupt checkpoint {folder}: cannot consolidate weights: "
                              f"{type(exc).__name__}: {exc}") from exc
    return weights, source, state


def apply_weights(model: torch.nn.Module, weights: dict) -> torch.nn.Module:
    """Load consolidated weights into ``model``; EMA shadow parameters override when present."""
    weights = dict(weights)
    ema = weights.pop("__ema__", None)
    model.load_state_dict(weights, strict=True)
    if ema is not None:
        from diffusers.training_utils import EMAModel

        holder = EMAModel([p.detach().float() for p in model.parameters()], foreach=True)
        holder.load_state_dict(ema)
        holder.copy_to(model.parameters())
    return model
