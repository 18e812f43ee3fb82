"""The per-plane 3D diffusion backbone: MONAI's ``DiffusionModelUNet`` inside a diffusers model class.

``DiffusionBackbone`` is a ``diffusers`` ``ModelMixin`` + ``ConfigMixin``, so ``save_pretrained`` /
``from_pretrained`` and safetensors come from the library. Its config also records the imaging plane,
the preprocessing spec (:mod:`pretrain.preprocess`) and the noise schedule (:mod:`pretrain.schedule`)
it was trained with, so a loaded backbone carries everything needed to reproduce its inputs.

Block names, for a U-Net with ``N = len(channels)`` levels (see :meth:`DiffusionBackbone.block_names`):

- ``down.i`` (i = 0..N-1): encoder level i, the last resnet/attention output *before* downsampling;
  ``channels[i]`` channels at 1/2**i of the input size.
- ``mid_0``, ``mid_1``, ``mid_2``: inside the middle block, after its first resnet, its attention and
  its second resnet (OrthoDiffusion's names); ``mid``: the middle block's output (equal to ``mid_2``).
  All ``channels[-1]`` channels at 1/2**(N-1).
- ``up.i`` (i = 0..N-1, deepest first): decoder block i, the output *before* upsampling;
  ``channels[N-1-i]`` channels at 1/2**(N-1-i). ``up.N-1`` is the full-resolution decoder output.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Sequence

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from monai.networks.nets import DiffusionModelUNet

from ..hub import HF_PREFIX, fetch_folder, is_local
from ..preprocess import PlanePreprocessing
from ..schedule import ScheduleConfig, build_scheduler

UNET_BLOCKS = {"down": "down_blocks", "up": "up_blocks"}  # feature block kind -> MONAI U-Net module list
# sub-blocks of MONAI's AttnMidBlock, in execution order
MID_PARTS = {"mid_0": "resnet_1", "mid_1": "attention", "mid_2": "resnet_2"}


class _Captured(Exception):
    """Raised by a feature hook once every requested block is stored: skips the rest of the U-Net."""


class DiffusionBackbone(ModelMixin, ConfigMixin):
    """3D U-Net noise predictor for one plane; ``forward`` is the DDPM training pass."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        channels: Sequence[int] = (32, 64, 64, 64),
        attention_levels: Sequence[bool] = (False, False, True, True),
        num_res_blocks: int | Sequence[int] = 2,
        num_head_channels: int | Sequence[int] = 32,
        norm_num_groups: int = 32,
        resblock_updown: bool = False,
        use_flash_attention: bool = False,
        plane: str = "sag",
        preprocessing: dict | None = None,
        schedule: dict | None = None,
    ):
        super().__init__()
        if preprocessing is not None:
            spec = PlanePreprocessing.from_dict(dict(preprocessing))
            if spec.plane != plane:
                raise ValueError(f"backbone plane '{plane}' differs from its preprocessing plane '{spec.plane}'")
            self.register_to_config(preprocessing=spec.to_dict())
        sched = ScheduleConfig(**(schedule or {}))
        sched.validate()
        self.register_to_config(schedule=sched.to_dict())  # store the schedule fully resolved
        self.unet = DiffusionModelUNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels or in_channels,
            channels=tuple(channels),
            attention_levels=tuple(attention_levels),
            num_res_blocks=num_res_blocks if isinstance(num_res_blocks, int) else tuple(num_res_blocks),
            num_head_channels=num_head_channels if isinstance(num_head_channels, int) else tuple(num_head_channels),
            norm_num_groups=norm_num_groups,
            resblock_updown=resblock_updown,
            use_flash_attention=use_flash_attention,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' ``from_pretrained``, also for ``s3://`` (fetched to ``cache_dir``) and ``hf://`` URLs."""
        url = str(pretrained_model_name_or_path)
        kwargs.setdefault("low_cpu_mem_usage", False)  # accelerate is optional; skip its warning
        if url.startswith(HF_PREFIX):
            url = url[len(HF_PREFIX):]
        elif not is_local(url):
            url = str(fetch_folder(url, kwargs.pop("cache_dir", None), kwargs.pop("storage_options", None)))
        return super().from_pretrained(url, **kwargs)

    # ----- description -------------------------------------------------------------------------
    @property
    def levels(self) -> int:
        return len(self.config.channels)

    def block_names(self) -> list[str]:
        """Valid names for :meth:`features`, encoder to decoder."""
        n = self.levels
        return [f"down.{i}" for i in range(n)] + [*MID_PARTS, "mid"] + [f"up.{i}" for i in range(n)]

    def block_prefix(self, name: str) -> str:
        """Parameter-name prefix of the block ``name`` (what fine-tuning that block unfreezes)."""
        if name == "mid":
            return "unet.middle_block."
        if name in MID_PARTS:
            return f"unet.middle_block.{MID_PARTS[name]}."
        kind, _, index = name.partition(".")
        return f"unet.{UNET_BLOCKS[kind]}.{index}."

    def block_channels(self) -> dict[str, int]:
        """Channels of each named feature map."""
        ch, n = list(self.config.channels), self.levels
        return ({f"down.{i}": ch[i] for i in range(n)} | {name: ch[-1] for name in (*MID_PARTS, "mid")}
                | {f"up.{i}": ch[n - 1 - i] for i in range(n)})

    def block_strides(self) -> dict[str, int]:
        """Downsampling factor of each named feature map relative to the input grid."""
        n = self.levels
        return ({f"down.{i}": 2 ** i for i in range(n)} | {name: 2 ** (n - 1) for name in (*MID_PARTS, "mid")}
                | {f"up.{i}": 2 ** (n - 1 - i) for i in range(n)})

    @property
    def preprocessing(self) -> PlanePreprocessing | None:
        """The stored preprocessing spec (None for a backbone built without one)."""
        pre = self.config.preprocessing
        return PlanePreprocessing.from_dict(dict(pre)) if pre is not None else None

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

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Predict the schedule's target (noise or velocity) for noisy ``x`` (B, C, S, R, C) at ``timesteps`` (B,)."""
        self._check_input(x)
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        return self.unet(x, timesteps)

    def _resolve_blocks(self, blocks: str | Iterable[str] | None) -> list[str]:
        valid = self.block_names()
        if blocks is None:
            return valid
        names = [blocks] if isinstance(blocks, str) else list(blocks)
        unknown = [b for b in names if b not in valid]
        if unknown or not names:
            raise ValueError(f"unknown feature block(s) {unknown or names}; valid: {', '.join(valid)}")
        return names

    @contextmanager
    def _capture(self, names: list[str], stop_after_last: bool = False):
        """Forward hooks that store the named block outputs into the yielded dict.

        With ``stop_after_last`` the hook of the last block (in execution order) raises
        :class:`_Captured`, so the rest of the U-Net is not computed.
        """
        store: dict[str, torch.Tensor] = {}
        handles = []
        order = self.block_names()
        last = max(names, key=order.index)

        def keep(name, pick):
            def hook(_module, args, output):
                store[name] = pick(args, output)
                if stop_after_last and name == last:
                    raise _Captured
            return hook

        for name in names:
            if name == "mid":
                handles.append(self.unet.middle_block.register_forward_hook(keep(name, lambda a, o: o)))
            elif name in MID_PARTS:
                part = getattr(self.unet.middle_block, MID_PARTS[name])
                handles.append(part.register_forward_hook(keep(name, lambda a, o: o)))
            elif name.startswith("down."):
                block = self.unet.down_blocks[int(name[5:])]
                k_last = len(block.resnets) - 1
                handles.append(block.register_forward_hook(keep(name, lambda a, o, k=k_last: o[1][k])))
            else:
                block = self.unet.up_blocks[int(name[3:])]
                if block.upsampler is not None:
                    handles.append(block.upsampler.register_forward_hook(keep(name, lambda a, o: a[0])))
                else:
                    handles.append(block.register_forward_hook(keep(name, lambda a, o: o)))
        try:
            yield store
        finally:
            for h in handles:
                h.remove()

    def features(
        self,
        volume: torch.Tensor,
        timesteps: int | Sequence[int],
        blocks: str | Iterable[str] | None = None,
        noise_draws: int = 1,
        seed: int = 0,
        scheduler=None,
    ) -> dict[str, torch.Tensor]:
        """Named intermediate feature maps of an (already preprocessed) volume at diffusion ``timesteps``.

        ``volume``: (B, C, S, R, C) or a single (C, S, R, C). For each timestep t the volume is noised to
        t with ``scheduler.add_noise`` (default: :meth:`make_scheduler`) and passed through the U-Net;
        the maps of ``blocks`` (default: all of :meth:`block_names`) are returned as
        ``{f"t{t}/{block}": (B, channels, s, r, c)}``, averaged over ``noise_draws`` draws.
        Draw d uses noise from a ``torch.Generator`` seeded with ``seed``: the same noise for every
        sample and every timestep, so a sample's features do not depend on its batch or on the other
        timesteps asked for. Gradients flow unless the caller uses ``torch.no_grad()``.
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
        noises = self._draw_noise(volume, noise_draws, seed)
        out: dict[str, torch.Tensor] = {}
        with self._capture(names, stop_after_last=True) as store:
            for t in steps:
                t_batch = torch.full((volume.shape[0],), t, dtype=torch.long, device=volume.device)
                sums: dict[str, torch.Tensor] = {}
                for noise in noises:
                    try:
                        self.unet(scheduler.add_noise(volume, noise.expand_as(volume), t_batch), t_batch)
                    except _Captured:
                        pass
                    for name in names:
                        sums[name] = store[name] if name not in sums else sums[name] + store[name]
                for name in names:
                    out[f"t{t}/{name}"] = sums[name] / noise_draws
        return out

    @staticmethod
    def _draw_noise(volume: torch.Tensor, draws: int, seed: int) -> list[torch.Tensor]:
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        shape = (1, *volume.shape[1:])
        return [torch.randn(shape, generator=gen, dtype=torch.float32).to(volume.device, volume.dtype)
                for _ in range(draws)]
