"""``downstream recon-seg-study`` and ``downstream acceleration-study`` (entries of the downstream CLI)::

    downstream recon-seg-study --config configs/sweeps/recon-seg.yaml [key=value ...]
    downstream acceleration-study --config configs/sweeps/acceleration.yaml [key=value ...]
"""

from __future__ import annotations

import argparse

from shards.config import Command, load_config


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="study YAML (configs/sweeps/recon-seg.yaml, acceleration.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the study config")


def _recon_seg_run(args: argparse.Namespace) -> int:
    from .multitask_study import ReconSegStudyConfig, run_recon_seg_study

    result = run_recon_seg_study(load_config(ReconSegStudyConfig, args.config, args.overrides))
    for r in result["summary"]:
        print(f"{r['acceleration']:g}x {r['method']}: SSIM {r['ssim']['mean']:.3f}, Dice {r['dice']['mean']:.3f}")
    print(f"run folder: {result['run_dir']} ({result['report']}, {result['html']})")
    return 0


def _acceleration_run(args: argparse.Namespace) -> int:
    from .acceleration import AccelerationStudyConfig, run_acceleration_study

    result = run_acceleration_study(load_config(AccelerationStudyConfig, args.config, args.overrides))
    print(result["table"])
    print(f"run folder: {result['run_dir']} ({result['report']}, {result['html']})")
    return 0


RECON_COMMANDS: dict[str, Command] = {
    "recon-seg-study": Command(_args, _recon_seg_run, "multitask (VarNet + segmentation) vs sequential vs "
                                                      "zero-filled: SSIM/PSNR/NMSE and Dice per acceleration"),
    "acceleration-study": Command(_args, _acceleration_run, "a fixed task model's AUROC/Dice on undersampled, "
                                                            "reconstructed test studies per acceleration"),
}
