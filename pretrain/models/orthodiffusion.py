"""OrthoDiffusion's plane backbone as an mskfm backbone (written here; no OrthoDiffusion code).

OrthoDiffusion (Lan et al. 2026, arXiv:2602.20752; code github.com/lt-0123/OrthoDiffusion, MIT) trains
one 3D noise predictor per imaging plane with med-ddpm: the guided-diffusion U-Net in 3D (64 base
channels, multipliers 1,1,2,2,4, one residual block per level, attention only at 16x downsampling and
in the middle block, timestep embedding with max period 1000), on 16x256x256 volumes scaled per
volume to [-1, 1], cosine schedule with 1000 steps. :class:`OrthoDiffusionBackbone` has the same
module tree, so its ``state_dict`` keys are OrthoDiffusion's ``denoise_fn.`` keys without that prefix
(``time_embed.0.weight``, ``input_blocks.1.0.in_layers.2.weight``, ..., ``out.2.bias``) and a released
checkpoint loads unchanged (see :mod:`pretrain.importers`).

Block names are OrthoDiffusion's own ``get_feature`` names: ``in_i`` (output of input block i),
``mid_0``/``mid_1``/``mid_2`` (after the middle block's resblock, attention, resblock) and ``out_i``
(output of output block i, after its upsampling where it has one). The model is a ``diffusers``
``ModelMixin`` + ``ConfigMixin`` with the same ``features()`` API as
:class:`pretrain.models.diffusion.DiffusionBackbone`.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from ..hub import HF_PREFIX, fetch_folder, is_local
from ..preprocess import PlanePreprocessing
from ..schedule import ScheduleConfig, build_scheduler

# OrthoDiffusion's published preprocessing: 16 central slices, bilinear 256x256, per-volume min-max.
ORTHODIFFUSION_PREPROCESSING = {"shape": [16, 256, 256], "spatial": "crop_resize", "intensity": "minmax",
                                "out_min": -1.0, "out_max": 1.0}
ORTHODIFFUSION_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "cosine", "prediction_type": "epsilon"}
BLOCK_MODULES = {"in": "input_blocks", "mid": "middle_block", "out": "output_blocks"}


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float) -> torch.Tensor:
    """Sinusoidal embedding (cosines first, then sines) of integer or fractional timesteps (B,)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (stable under bf16/fp16), returned in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus the projected timestep embedding, GroupNorm-SiLU-dropout-conv, skip."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int, dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(groups, channels), nn.SiLU(),
                                       nn.Conv3d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(groups, out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        _zero(nn.Conv3d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv3d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb).type(x.dtype)[:, :, None, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Self-attention over all voxels; heads are split before q/k/v (guided-diffusion's legacy order)."""

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention channels {channels} are not divisible by num_heads {heads}")
        self.heads = heads
        self.norm = GroupNorm32(groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        flat = x.reshape(b, c, -1)
        # (batch, heads, voxels, c/heads) each, 4-D with unit stride in the last dimension: what the
        # fused (flash, memory-efficient) kernels of scaled_dot_product_attention need
        qkv = self.qkv(self.norm(flat)).reshape(b, self.heads, 3 * c // self.heads, -1)
        q, k, v = qkv.transpose(2, 3).contiguous().chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, c, -1)
        return (flat + self.proj_out(h)).reshape(b, c, *spatial)


class Downsample(nn.Module):
    """Strided 3x3x3 convolution: halves slices, rows and cols."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv3d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Trilinear x2 in every dimension, then a 3x3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="trilinear"))


class TimestepSequential(nn.Sequential):
    """Layers in order; residual blocks also receive the timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class OrthoDiffusionBackbone(ModelMixin, ConfigMixin):
    """OrthoDiffusion's 3D U-Net noise predictor for one plane; ``forward`` is the DDPM training pass.

    ``attention_levels``: one flag per level (as ``DiffusionBackbone``); OrthoDiffusion's "attention at
    resolution 16" of a 256 input is the level at 16x downsampling, the last of five.
    ``preprocessing`` / ``schedule`` default to OrthoDiffusion's published ones.
    ``activation_checkpointing`` recomputes each block in the backward pass (diffusers' gradient
    checkpointing): the published size then trains at batch 1 in a few GB.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        model_channels: int = 64,
        channel_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 1,
        attention_levels: Sequence[bool] = (False, False, False, False, True),
        num_heads: int = 1,
        norm_num_groups: int = 32,
        dropout: float = 0.0,
        time_embed_max_period: float = 1000.0,
        activation_checkpointing: bool = False,
        plane: str = "sag",
        preprocessing: dict | None = None,
        schedule: dict | None = None,
    ):
        super().__init__()
        if len(attention_levels) != len(channel_mult):
            raise ValueError(f"attention_levels {list(attention_levels)} needs one flag per level of "
                             f"channel_mult {list(channel_mult)}")
        spec = PlanePreprocessing.from_dict(dict(preprocessing or {"plane": plane, **ORTHODIFFUSION_PREPROCESSING}))
        if spec.plane != plane:
            raise ValueError(f"backbone plane '{plane}' differs from its preprocessing plane '{spec.plane}'")
        sched = ScheduleConfig(**(ORTHODIFFUSION_SCHEDULE | dict(schedule or {})))
        sched.validate()
        self.register_to_config(preprocessing=spec.to_dict(), schedule=sched.to_dict())

        emb = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        res = lambda cin, cout: ResBlock(cin, emb, cout, norm_num_groups, dropout)  # noqa: E731
        attn = lambda c: AttentionBlock(c, num_heads, norm_num_groups)  # noqa: E731

        ch = model_channels * channel_mult[0]
        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv3d(in_channels, ch, 3, padding=1))])
        skips = [ch]
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, model_channels * mult)]
                ch = model_channels * mult
                if attention_levels[level]:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepSequential(*layers))
                skips.append(ch)
            if level < len(channel_mult) - 1:
                self.input_blocks.append(TimestepSequential(Downsample(ch)))
                skips.append(ch)
        self.middle_block = TimestepSequential(res(ch, ch), attn(ch), res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skips.pop(), model_channels * channel_mult[level])]
                ch = model_channels * channel_mult[level]
                if attention_levels[level]:
                    layers.append(attn(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(norm_num_groups, ch), nn.SiLU(),
                                 _zero(nn.Conv3d(ch, out_channels, 3, padding=1)))
        self.gradient_checkpointing = False
        if activation_checkpointing:
            self.enable_gradient_checkpointing()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' ``from_pretrained``, also for ``s3://`` (fetched to ``cache_dir``) and ``hf://`` URLs."""
        url = str(pretrained_model_name_or_path)
        kwargs.setdefault("low_cpu_mem_usage", False)
        if url.startswith(HF_PREFIX):
            url = url[len(HF_PREFIX):]
        elif not is_local(url):
            url = str(fetch_folder(url, kwargs.pop("cache_dir", None), kwargs.pop("storage_options", None)))
        return super().from_pretrained(url, **kwargs)

    # ----- description -------------------------------------------------------------------------
    @property
    def levels(self) -> int:
        return len(self.config.channel_mult)

    def block_names(self) -> list[str]:
        """Valid names for :meth:`features` (OrthoDiffusion's), in execution order."""
        return ([f"in_{i}" for i in range(len(self.input_blocks))] + ["mid_0", "mid_1", "mid_2"]
                + [f"out_{i}" for i in range(len(self.output_blocks))])

    def block_prefix(self, name: str) -> str:
        """Parameter-name prefix of the block ``name`` (what fine-tuning that block unfreezes)."""
        kind, _, index = name.partition("_")
        return f"{BLOCK_MODULES[kind]}.{index}."

    @property
    def preprocessing(self) -> PlanePreprocessing:
        return PlanePreprocessing.from_dict(dict(self.config.preprocessing))

    def make_scheduler(self):
        """A fresh diffusers scheduler for the schedule this backbone was configured with."""
        return build_scheduler(ScheduleConfig(**self.config.schedule))

    # ----- compute -----------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected input (batch, {self.config.in_channels}, slices, rows, cols), "
                             f"got {tuple(x.shape)}")
        div = 2 ** (self.levels - 1)
        if any(s % div for s in x.shape[2:]):
            raise ValueError(f"spatial size {tuple(x.shape[2:])} must be divisible by {div} "
                             f"for a {self.levels}-level U-Net")

    def _call_block(self, layer: nn.Module, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        args = (h,) if isinstance(layer, AttentionBlock) else (h, emb)
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(layer, *args)
        return layer(*args)

    def _run(self, x: torch.Tensor, timesteps: torch.Tensor, keep: Iterable[str] = ()):
        """The U-Net pass; returns ``(prediction or None, {name: map})``, stopping once ``keep`` is stored."""
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels,
                                                 self.config.time_embed_max_period).to(x.dtype))
        wanted, maps, skips, h = set(keep), {}, [], x

        def stored(name: str) -> bool:
            if name in wanted:
                maps[name] = h
                wanted.discard(name)
                return not wanted
            return False

        for i, block in enumerate(self.input_blocks):
            h = self._call_block(block, h, emb)
            skips.append(h)
            if stored(f"in_{i}"):
                return None, maps
        for i, layer in enumerate(self.middle_block):
            h = self._call_block(layer, h, emb)
            if stored(f"mid_{i}"):
                return None, maps
        for i, block in enumerate(self.output_blocks):
            h = self._call_block(block, torch.cat([h, skips.pop()], dim=1), emb)
            if stored(f"out_{i}"):
                return None, maps
        return self.out(h), maps

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Predict the noise in ``x`` (B, C, S, R, C) at ``timesteps`` (B,) or a scalar."""
        self._check_input(x)
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        return self._run(x, timesteps)[0]

    def _resolve_blocks(self, blocks: str | Iterable[str] | None) -> list[str]:
        valid = self.block_names()
        if blocks is None:
            return valid
        names = [blocks] if isinstance(blocks, str) else list(blocks)
        unknown = [b for b in names if b not in valid]
        if unknown or not names:
            raise ValueError(f"unknown feature block(s) {unknown or names}; valid: {', '.join(valid)}")
        return names

    def features(
        self,
        volume: torch.Tensor,
        timesteps: int | Sequence[int],
        blocks: str | Iterable[str] | None = None,
        noise_draws: int = 1,
        seed: int = 0,
        scheduler=None,
    ) -> dict[str, torch.Tensor]:
        """Named feature maps of a preprocessed volume at diffusion ``timesteps`` (as ``DiffusionBackbone``).

        Returns ``{f"t{t}/{block}": (B, channels, s, r, c)}``, averaged over ``noise_draws``. Draw d is
        the d-th ``torch.randn`` of a CPU generator seeded with ``seed``, of shape (1, C, S, R, C) and
        shared by every sample and timestep. For one sample this is OrthoDiffusion's
        ``get_feature(x, t, name=block)`` after ``torch.manual_seed(seed)`` (same noise, same maps).
        """
        if volume.ndim == 4:
            volume = volume[None]
        self._check_input(volume)
        if noise_draws < 1:
            raise ValueError(f"noise_draws must be >= 1, got {noise_draws}")
        names = self._resolve_blocks(blocks)
        steps = [int(t) for t in torch.as_tensor(timesteps).flatten().tolist()]
        scheduler = scheduler or self.make_scheduler()
        n_train = scheduler.config.num_train_timesteps
        bad = [t for t in steps if not 0 <= t < n_train]
        if bad or not steps:
            raise ValueError(f"timesteps {bad or steps} outside [0, {n_train}) of the noise schedule")
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        noises = [torch.randn((1, *volume.shape[1:]), generator=gen, dtype=torch.float32)
                  .to(volume.device, volume.dtype) for _ in range(noise_draws)]
        out: dict[str, torch.Tensor] = {}
        for t in steps:
            t_batch = torch.full((volume.shape[0],), t, dtype=torch.long, device=volume.device)
            sums: dict[str, torch.Tensor] = {}
            for noise in noises:
                _, maps = self._run(scheduler.add_noise(volume, noise.expand_as(volume), t_batch), t_batch, names)
                sums = {n: maps[n] + sums[n] if n in sums else maps[n] for n in names}
            out |= {f"t{t}/{n}": sums[n] / noise_draws for n in names}
        return out
