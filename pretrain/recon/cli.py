"""``pretrain eval-recon <backbone> --data <recon shards> --masks ... --accelerations 4,8 [--set key=value ...]``.

:func:`add_recon_parsers` adds ``eval-recon`` and ``recon-study`` to the ``pretrain`` CLI;
``python -m pretrain.recon eval-recon ...`` runs the same things on their own.

    pretrain recon-study --config configs/sweeps/recon-transfer.yaml [key=value ...]
"""

from __future__ import annotations

import argparse
import sys

from shards.config import ConfigError, load_config


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_eval_recon_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval-recon", help="fastMRI metrics of a reconstruction backbone")
    p.add_argument("backbone", help="published reconstruction backbone folder or URL")
    p.add_argument("--config", default=None, help="YAML with EvalReconConfig keys (configs/pretrain/eval-recon.yaml)")
    p.add_argument("--data", default=None, help="recon shards folder or URL (key 'source')")
    p.add_argument("--masks", default=None, help="comma-separated mask kinds, e.g. equispaced1d,random1d")
    p.add_argument("--accelerations", default=None, help="comma-separated accelerations, e.g. 4,8")
    p.add_argument("--baseline", action="append", default=[], metavar="NAME=URL",
                   help="another published backbone to score in the same table (repeatable)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any EvalReconConfig key, e.g. --set max_slices=20 (repeatable)")
    p.set_defaults(func=run_eval_recon_cli)
    return p


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


def add_recon_study_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("recon-study", help="cross-anatomy transfer / data-size reconstruction study")
    p.add_argument("--config", required=True, help="configs/sweeps/recon-transfer.yaml or recon-data-size.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides of ReconStudyConfig")
    p.set_defaults(func=run_recon_study_cli)
    return p


def run_recon_study_cli(args) -> int:
    from .study import ReconStudyConfig, run_study

    cfg = load_config(ReconStudyConfig, args.config, list(args.overrides))
    result = run_study(cfg)
    for r in result["results"]:
        scores = ", ".join(f"{a} {v[cfg.metric]:.4f}" for a, v in r["test"].items())
        print(f"{r['condition']} ({r['train_slices']} slices): {cfg.metric} {scores}")
    print(f"run folder: {result['run_dir']} (heatmap.png)")
    return 0


def add_recon_parsers(subparsers) -> None:
    """The reconstruction subcommands of the ``pretrain`` CLI: ``eval-recon`` and ``recon-study``."""
    add_eval_recon_parser(subparsers)
    add_recon_study_parser(subparsers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.recon")
    sub = parser.add_subparsers(dest="command", required=True)
    add_recon_parsers(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
