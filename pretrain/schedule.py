"""Noise schedules for the diffusion backbones: thin construction around ``diffusers`` schedulers.

The schedule is kept apart from the network (as in diffusers): the training loop builds a scheduler
from :class:`ScheduleConfig`, noises clean volumes with ``scheduler.add_noise`` and regresses the
target returned by :func:`training_target`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from diffusers import DDPMScheduler

BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2", "squaredcos_cap_v2": "squaredcos_cap_v2"}
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class ScheduleConfig:
    """DDPM noise schedule. ``beta_schedule``: linear | cosine (diffusers' squaredcos_cap_v2)."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: str = "epsilon"

    def validate(self) -> None:
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"schedule.beta_schedule '{self.beta_schedule}' is unknown; "
                             f"known: {', '.join(BETA_SCHEDULES)}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"schedule.prediction_type '{self.prediction_type}' is unknown; "
                             f"known: {', '.join(PREDICTION_TYPES)}")
        if self.num_train_timesteps < 1:
            raise ValueError(f"schedule.num_train_timesteps must be >= 1, got {self.num_train_timesteps}")

    def to_dict(self) -> dict:
        return asdict(self)


def build_scheduler(cfg: ScheduleConfig | dict | None = None) -> DDPMScheduler:
    """A diffusers ``DDPMScheduler`` for ``cfg`` (a :class:`ScheduleConfig` or its dict form)."""
    if cfg is None:
        cfg = ScheduleConfig()
    elif isinstance(cfg, dict):
        cfg = ScheduleConfig(**cfg)
    cfg.validate()
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=BETA_SCHEDULES[cfg.beta_schedule],
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=cfg.prediction_type,
        clip_sample=False,
    )


def training_target(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """What the network regresses at ``timesteps``: the noise (epsilon) or the velocity (v)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    raise ValueError(f"unknown prediction_type '{kind}'; known: {', '.join(PREDICTION_TYPES)}")


def sample_timesteps(scheduler: DDPMScheduler, batch: int, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform integer timesteps in [0, num_train_timesteps) for a training batch."""
    n = scheduler.config.num_train_timesteps
    return torch.randint(0, n, (batch,), generator=generator, device="cpu").to(device)
