"""``pretrain eval-recon <backbone> --data <recon shards> --masks ... --accelerations 4,8 [--set key=value ...]``.

:data:`RECON_COMMANDS` are the ``eval-recon`` and ``recon-study`` entries of the ``pretrain`` CLI's
command table; ``python -m pretrain.recon eval-recon ...`` runs the same things on their own.

    pretrain recon-study --config configs/sweeps/recon-transfer.yaml [key=value ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from shards.config import Command, ConfigError, build_cli, load_config, run_cli


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_eval_recon_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("backbone", help="published reconstruction backbone folder or URL")
    p.add_argument("--config", default=None, help="YAML with keys of EvalReconConfig (pretrain/recon/evaluate.py)")
    p.add_argument("--data", default=None, help="recon shards folder or URL (key 'source')")
    p.add_argument("--masks", default=None, help="comma-separated mask kinds, e.g. equispaced1d,random1d")
    p.add_argument("--accelerations", default=None, help="comma-separated accelerations, e.g. 4,8")
    p.add_argument("--baseline", action="append", default=[], metavar="NAME=URL",
                   help="another published backbone to score in the same table (repeatable)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any EvalReconConfig key, e.g. --set max_slices=20 (repeatable)")


def run_eval_recon_cli(args) -> int:
    from .evaluate import EvalReconConfig, evaluate_recon

    overrides = [f"backbone={args.backbone}"]
    if args.data:
        overrides.append(f"source={args.data}")
    if args.masks:
        overrides.append(f"masks=[{','.join(_csv(args.masks))}]")
    if args.accelerations:
        overrides.append(f"accelerations=[{','.join(_csv(args.accelerations))}]")
    for item in args.baseline:
        name, _, url = item.partition("=")
        if not url:
            raise ConfigError(f"--baseline '{item}': expected NAME=URL")
        overrides.append(f"baselines.{name}={url}")
    cfg = load_config(EvalReconConfig, args.config, overrides + list(args.overrides))
    result = evaluate_recon(cfg)
    print("\n\n".join(result["tables"]))
    for setting, speed in result["throughput_slices_per_s"].items():
        print(f"throughput {setting}: " + ", ".join(f"{k} {v:.1f} slices/s" for k, v in speed.items()))
    print(f"run folder: {result['run_dir']}")
    return 0


def add_recon_study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="configs/sweeps/recon-transfer.yaml or recon-data-size.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides of ReconStudyConfig")


def run_recon_study_cli(args) -> int:
    from .study import ReconStudyConfig, run_study

    cfg = load_config(ReconStudyConfig, args.config, list(args.overrides))
    result = run_study(cfg)
    for r in result["results"]:
        scores = ", ".join(f"{a} {v[cfg.metric]:.4f}" for a, v in r["test"].items())
        print(f"{r['condition']} ({r['train_slices']} slices): {cfg.metric} {scores}")
    print(f"run folder: {result['run_dir']} (heatmap.png, {Path(result['report']).name}, {Path(result['html']).name})")
    return 0


RECON_COMMANDS: dict[str, Command] = {
    "eval-recon": Command(add_eval_recon_arguments, run_eval_recon_cli, "fastMRI metrics of a reconstruction backbone"),
    "recon-study": Command(add_recon_study_arguments, run_recon_study_cli,
                           "cross-anatomy transfer / data-size reconstruction study"),
}


def main(argv: list[str] | None = None) -> int:
    parser = build_cli("python -m pretrain.recon", __doc__.splitlines()[0], RECON_COMMANDS)
    return run_cli(parser, RECON_COMMANDS, argv, errors=(ValueError, FileNotFoundError))
