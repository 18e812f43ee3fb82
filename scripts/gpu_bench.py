"""GPU pretraining step benchmark at OrthoDiffusion's size (``scripts/bench_pretrain.py --gpu``).

One process, one device, no Ray and no DeepSpeed: the paper-size backbone of
``configs/pretrain/orthodiffusion-knee.yaml`` (:class:`pretrain.models.orthodiffusion.OrthoDiffusionBackbone`,
34.5M parameters, 16x256x256) trained with the DDPM epsilon objective and AdamW on volumes from a
DataLoader (random volumes made by CPU workers, pinned, copied without blocking), in variants:

- ``fp32``: fp32 eager; ``bf16``: bf16 autocast (GroupNorm stays fp32 inside the model);
- ``-cl``: channels-last 3D weights and inputs (GroupNorm does not keep the layout: measured, not assumed);
- ``-compile``: ``torch.compile``; ``-flash`` / ``-math``: the attention blocks' ``scaled_dot_product_attention``
  restricted to the flash kernel, or to the unfused math kernel.

Per variant: samples/s, voxels/s, data-wait fraction (time blocked on the loader and the copy),
peak device memory, and MFU: model FLOPs of one step counted by ``torch.utils.flop_counter.FlopCounterMode``
on the meta device (8.09 TFLOP per 16x256x256 sample, forward + backward) over the step time, against the device's dense bf16 peak (:data:`BF16_PEAK_TFLOPS` by device name,
``--peak-tflops`` to override; fp32 rows use the same bf16 peak, so their MFU shows what bf16 gains).

Imports: torch, PyYAML and mskfm's model module, which needs diffusers, MONAI, fsspec and OmegaConf
(a bare torch image lacks them: ``scripts/gpu_bench_bundle.sh`` downloads their wheels to carry).
``--device cpu --tiny`` runs the same code on a tiny model in seconds (the smoke test).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "pretrain" / "orthodiffusion-knee.yaml"
VARIANTS = ("fp32", "bf16", "bf16-cl", "bf16-flash", "bf16-math", "bf16-compile", "bf16-cl-compile",
            "bf16-compile-flash")
# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets; matched as
# substrings of torch.cuda.get_device_name(), first match wins (more specific names first).
BF16_PEAK_TFLOPS = {
    "GB200": 2500.0, "B200": 2250.0, "H200": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4,
    "H800": 989.4, "GH200": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.1, "L40": 181.0, "L4": 121.0,
    "A10G": 70.0, "A10": 125.0, "RTX 6000 Ada": 364.2, "RTX 4090": 165.2, "RTX 3090": 71.0, "V100": 0.0,
}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v or None for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def model_kwargs(tiny: bool) -> tuple[dict, tuple[int, int, int]]:
    """The backbone's constructor arguments and input shape: the paper-size config, or a tiny one."""
    import yaml

    cfg = yaml.safe_load(CONFIG.read_text())
    kwargs = {k: v for k, v in cfg["model"].items() if k not in ("backbone", "activation_checkpointing")}
    shape = tuple(cfg["shape"])
    if tiny:
        kwargs |= {"model_channels": 8, "channel_mult": [1, 2], "attention_levels": [False, True],
                   "norm_num_groups": 4}
        shape = (8, 32, 32)
    kwargs["preprocessing"] = {"plane": "sag", "shape": list(shape), "spatial": "crop_resize",
                               "intensity": "minmax", "out_min": -1.0, "out_max": 1.0}
    return kwargs, shape


class RandomVolumes(torch.utils.data.IterableDataset):
    """Endless batches of random volumes in [-1, 1] made on CPU workers (the input pipeline's cost floor)."""

    def __init__(self, batch: int, shape: tuple[int, int, int]):
        self.batch, self.shape = batch, shape

    def __iter__(self):
        gen = torch.Generator().manual_seed(torch.utils.data.get_worker_info().id if
                                            torch.utils.data.get_worker_info() else 0)
        while True:
            yield torch.rand((self.batch, 1, *self.shape), generator=gen) * 2 - 1


def sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel(kernels[name]) if name in kernels else contextlib.nullcontext()


class Step:
    """One training step of a variant: noise, the model, epsilon MSE, AdamW."""

    def __init__(self, variant: str, kwargs: dict, device: torch.device):
        from pretrain.models.orthodiffusion import OrthoDiffusionBackbone

        parts = set(variant.split("-"))
        self.bf16, self.cl = "bf16" in parts, "cl" in parts
        self.attention = "flash" if "flash" in parts else "math" if "math" in parts else "auto"
        self.device = device
        torch.manual_seed(0)
        self.model = OrthoDiffusionBackbone(**kwargs).to(device).train()
        if self.cl:
            self.model = self.model.to(memory_format=torch.channels_last_3d)
        self.alphas = self.model.make_scheduler().alphas_cumprod.to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=device.type == "cuda")
        self.forward = torch.compile(self.model) if "compile" in parts else self.model
        self.params = sum(p.numel() for p in self.model.parameters())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.cl:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        t = torch.randint(0, len(self.alphas), (x.shape[0],), device=self.device)
        noise = torch.randn_like(x)
        a = self.alphas[t].view(-1, 1, 1, 1, 1)
        noisy = a.sqrt() * x + (1 - a).sqrt() * noise
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16), sdpa_backend(self.attention):
            loss = (self.forward(noisy, t).float() - noise).pow(2).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_flops(kwargs: dict, batch: int, shape: tuple) -> int:
    """Model FLOPs of one forward + backward, counted by FlopCounterMode on the meta device (shapes
    only: no compute, no memory; activation checkpointing's recomputation is not counted, as MFU asks)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pretrain.models.orthodiffusion import OrthoDiffusionBackbone

    with torch.device("meta"):
        model = OrthoDiffusionBackbone(**(kwargs | {"activation_checkpointing": False}))
        x, t = torch.randn(batch, 1, *shape), torch.zeros(batch, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        model(x, t).pow(2).mean().backward()
    return counter.get_total_flops()


def run_variant(variant: str, args, kwargs: dict, shape: tuple, device: torch.device, peak: float | None) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step = Step(variant, kwargs, device)
    loader = iter(torch.utils.data.DataLoader(RandomVolumes(args.batch, shape), batch_size=None,
                                              num_workers=args.loader_workers, pin_memory=device.type == "cuda",
                                              persistent_workers=args.loader_workers > 0))
    flops = step_flops(kwargs, args.batch, shape)
    wait = 0.0
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            sync(device)
            wait, start, cpu = 0.0, time.perf_counter(), time.process_time()
        t0 = time.perf_counter()
        x = next(loader).to(device, non_blocking=True)
        wait += time.perf_counter() - t0
        loss = step(x).detach()
    sync(device)
    wall = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise RuntimeError(f"{variant}: non-finite loss {loss.item()}")
    per_s = args.steps * args.batch / wall
    voxels = per_s * shape[0] * shape[1] * shape[2]
    tflops = flops * args.steps / wall / 1e12
    return {"variant": variant, "params": step.params, "batch": args.batch, "shape": list(shape),
            "samples_per_s": per_s, "voxels_per_s": voxels, "data_wait_frac": wait / wall,
            "step_s": wall / args.steps, "process_cpu_s_per_step": (time.process_time() - cpu) / args.steps,
            "tflop_per_step": flops / 1e12, "achieved_tflops": tflops, "mfu": tflops / peak if peak else None, "loss": loss.item(),
            "peak_mem_gib": (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)}


def third_party_imports() -> list[str]:
    """Distributions whose modules this process imported (what a bare machine must have)."""
    from importlib.metadata import packages_distributions

    dists = packages_distributions()
    names = {m.split(".")[0] for m in list(sys.modules)}
    return sorted({d for n in names for d in dists.get(n, ()) if n not in sys.stdlib_module_names})


def markdown(rows: list[dict], device: str, peak: float | None) -> str:
    lines = [f"Device: {device}; bf16 peak {peak or 'unknown'} TFLOP/s; load average {os.getloadavg()[0]:.1f}", "",
             "| variant | samples/s | voxels/s | data wait | step (s) | TFLOP/s | MFU | peak memory (GiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "n/a"
        lines.append(f"| {r['variant']} | {r['samples_per_s']:.2f} | {r['voxels_per_s']:.3g} | "
                     f"{100 * r['data_wait_frac']:.1f}% | {r['step_s']:.3f} | {r['achieved_tflops']:.3g} | {mfu} | {mem} |")
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("--gpu")
    g.add_argument("--device", default="cuda", help="cuda (default) or cpu (the smoke test)")
    g.add_argument("--tiny", action="store_true", help="a tiny model at 8x32x32 (smoke test)")
    g.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    g.add_argument("--batch", type=int, default=2, help="volumes per step")
    g.add_argument("--loader-workers", type=int, default=4)
    g.add_argument("--peak-tflops", type=float, default=None, help="the device's bf16 peak (overrides the table)")
    g.add_argument("--checkpointing", action="store_true", help="activation checkpointing (the paper size on CPU)")
    g.add_argument("--json", type=Path, default=None, help="write every row and the imports here")


def main(args) -> str:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device (use --device cpu --tiny for the smoke test)")
    sys.path.insert(0, str(ROOT))
    kwargs, shape = model_kwargs(args.tiny)
    kwargs["activation_checkpointing"] = args.checkpointing
    peak = peak_tflops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    rows = []
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant '{variant}'; known: {', '.join(VARIANTS)}")
        rows.append(run_variant(variant, args, kwargs, shape, device, peak))
        print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)
    text = markdown(rows, name, peak)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": name, "peak_tflops": peak, "torch": torch.__version__,
                                         "rows": rows, "imports": third_party_imports()}, indent=1))
    return text
