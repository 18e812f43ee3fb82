"""Checkpoints of the training loop: DeepSpeed engine state + EMA + a small JSON of loop state.

A checkpoint is one folder (one per saved step) holding, under tag ``state/``, DeepSpeed's model
states and each rank's ZeRO optimizer partition, plus (rank 0) ``weights.safetensors`` (the full
fp32 weights, gathered from the ZeRO partitions), ``ema.safetensors`` (the EMA weights, its
settings in the file's metadata) and ``loop_state.json`` (step, seed, metrics and the sha256 of
every file of every rank). Each rank first writes its files into its own staging folder; the
launcher's session then makes them durable (Ray Train merges the ranks' folders in
``storage_path``; the file session copies them). ``loop_state.json`` lists every file, so a damaged
or incomplete checkpoint is refused with its path instead of being skipped.

Nothing is unpickled: every file's sha256 is checked before anything is loaded, publishing reads
only safetensors, and DeepSpeed's own files are read with ``torch.load(weights_only=True)``, which
rebuilds tensors, containers and the few DeepSpeed classes listed in :data:`DEEPSPEED_GLOBALS`.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from shards.config import UserError
from shards.manifest import sha256_of

TAG = "state"
LOOP_STATE = "loop_state.json"
EMA_FILE = "ema.safetensors"
LEGACY_EMA_FILE = "ema.pt"  # checkpoints written before the EMA went to safetensors
WEIGHTS_FILE = "weights.safetensors"
# The non-tensor objects in DeepSpeed's ZeRO checkpoints: the only classes a load may rebuild.
DEEPSPEED_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                     "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                     "deepspeed.runtime.zero.config.ZeroStageEnum",
                     "deepspeed.utils.tensor_fragment.fragment_address")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message names its path."""



def _file_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_of(str(p))
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOOP_STATE}


def safe_load(path, map_location=None):
    """``torch.load`` that runs no code from the file: tensors, containers, :data:`DEEPSPEED_GLOBALS`."""
    allowed = [getattr(importlib.import_module(m), name)
               for m, _, name in (g.rpartition(".") for g in DEEPSPEED_GLOBALS)]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location=map_location, weights_only=True)


def _save_ema(ema, path: Path) -> None:
    state = dict(ema.state_dict())
    tensors = {f"shadow.{i}": p.detach().float().cpu().contiguous().clone()
               for i, p in enumerate(state.pop("shadow_params"))}
    save_file(tensors, str(path), metadata={"ema": json.dumps(state)})


def load_ema_state(folder: Path) -> dict:
    """The EMA state dict of a checkpoint (diffusers ``EMAModel.state_dict()`` form)."""
    path = folder / EMA_FILE
    if not path.is_file():
        return safe_load(folder / LEGACY_EMA_FILE, map_location="cpu")
    with safe_open(str(path), framework="pt") as f:
        state = json.loads(f.metadata()["ema"])
        state["shadow_params"] = [f.get_tensor(f"shadow.{i}") for i in range(len(f.keys()))]
    return state


def _full_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every entry of the module's state dict in full fp32; a collective under ZeRO (all ranks call)."""
    from deepspeed.utils import safe_get_full_fp32_param

    params = dict(module.named_parameters())
    out = {}
    for name, value in module.state_dict().items():
        full = safe_get_full_fp32_param(params[name]) if name in params else None
        value = (full if full is not None else value).detach()
        out[name] = (value.float() if value.is_floating_point() else value).cpu().contiguous().clone()
    return out


def _gather(obj, world_size: int) -> list:
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def save_checkpoint(engine, ema, loop_state: dict, staging: str | Path) -> Path:
    """Write this rank's part of a checkpoint into ``staging``; every rank must call it.

    Rank 0 also writes the full fp32 weights, the EMA weights and ``loop_state.json`` (with all
    ranks' file hashes).
    """
    staging = Path(staging)
    staging.mkdir(parents=True, exist_ok=True)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    engine.save_checkpoint(str(staging), tag=TAG, save_latest=False)
    weights = _full_weights(engine.module)
    if rank == 0:
        save_file(weights, str(staging / WEIGHTS_FILE))
    if rank == 0 and ema is not None:
        _save_ema(ema, staging / EMA_FILE)
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
            if sha256_of(str(f)) != digest:
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
    engine.checkpoint_engine.load = safe_load  # DeepSpeed's own loader unpickles
    try:
        path, _ = engine.load_checkpoint(str(folder), tag=TAG, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    except Exception as exc:
        raise CheckpointError(f"corrupt checkpoint {folder}: DeepSpeed cannot load it: "
                              f"{type(exc).__name__}: {exc}") from exc
    if path is None:
        raise CheckpointError(f"corrupt checkpoint {folder}: DeepSpeed found no state under tag '{TAG}'")
    if ema is not None:
        if not any((folder / f).is_file() for f in (EMA_FILE, LEGACY_EMA_FILE)):
            raise CheckpointError(f"corrupt checkpoint {folder}: {folder / EMA_FILE} is missing")
        ema.load_state_dict(load_ema_state(folder))
    return state


def consolidated_state_dict(folder: str | Path, prefer_ema: bool = True) -> tuple[dict, str, dict]:
    """Full fp32 weights of a checkpoint (``weights.safetensors``, gathered from ZeRO when saved).

    Returns ``(weights, source, loop_state)``; source is ``"ema"`` when the EMA state is included
    (under the key ``"__ema__"``; :func:`apply_weights` applies it), else ``"fp32"``, or
    ``"module"`` for checkpoints written before full weights were saved (the module's own copy).
    """
    folder = Path(folder)
    state = read_loop_state(folder)
    try:
        if (folder / WEIGHTS_FILE).is_file():
            weights, source = load_file(str(folder / WEIGHTS_FILE)), "fp32"
        else:
            blob = safe_load(folder / TAG / "mp_rank_00_model_states.pt", map_location="cpu")
            weights, source = {k: v.float() for k, v in blob["module"].items()}, "module"
        if prefer_ema and any((folder / f).is_file() for f in (EMA_FILE, LEGACY_EMA_FILE)):
            weights, source = {**weights, "__ema__": load_ema_state(folder)}, "ema"
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
