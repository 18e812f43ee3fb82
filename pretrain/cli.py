"""``pretrain`` command line.

    pretrain run --config configs/pretrain/tiny.yaml [key=value ...]
    pretrain publish <run name or folder> --to hub [--plane sag] [--overwrite]
    pretrain eval-recon <published recon backbone> --data <recon shards> --masks ... --accelerations 4,8
    pretrain recon-study --config configs/sweeps/recon-transfer.yaml [key=value ...]
    pretrain import <checkpoint file | hf://owner/repo/file> --format orthodiffusion --plane sag --to <folder>
                    [--set key=value ...] [--overwrite]

``run`` trains every plane of the config with its launcher and writes ``<run_root>/<name>/``
(``config.yaml``, ``metrics.json``, per plane ``metrics.jsonl``); running it again with the same
``name`` resumes from the newest checkpoint. ``publish`` consolidates each plane's newest
checkpoint to full weights (EMA when present) and writes a published backbone per plane.
``import`` converts a published foundation model's checkpoint (tensors only, EMA preferred) into a
backbone folder that ``downstream`` uses like any other (:mod:`pretrain.importers`).
"""

from __future__ import annotations

import argparse
import os
import sys

from shards.config import Command, build_cli, load_config, run_cli
from shards.reader import ShardError
from shards.schema import PLANES

from .loop import NonFiniteLossError
from .recon.cli import RECON_COMMANDS


def cmd_run(args) -> int:
    from .config import PretrainConfig, run_dir
    from .run import is_rank0, train

    cfg = load_config(PretrainConfig, args.config, args.overrides)
    results = train(cfg)
    if is_rank0(cfg):
        for unit, m in results.items():
            print(f"{cfg.name}/{unit}: {m.get('steps')} steps, final loss {m.get('final_loss')}")
        print(f"run folder: {run_dir(cfg)}")
    return 0


def cmd_publish(args) -> int:
    from .run import load_run_config, publish_run

    cfg = load_run_config(args.run, args.run_root)
    for unit, url in publish_run(cfg, args.to, args.plane, args.overwrite).items():
        print(f"published {cfg.name}/{unit} -> {url}")
    return 0


def cmd_import(args) -> int:
    from .importers import import_checkpoint

    out = import_checkpoint(args.source, args.format, args.plane, args.to, args.overrides, args.overwrite)
    print(f"imported {args.format} {args.plane} backbone {args.source} -> {out}")
    return 0


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="configs/pretrain/<name>.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. launcher=local optim.total_steps=20")


def _publish_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run name (under --run-root) or run folder")
    p.add_argument("--to", required=True, help="hub: a folder, s3:// URL or hf://owner (one folder per plane)")
    p.add_argument("--plane", action="append", help="publish only this plane (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing published version")
    p.add_argument("--run-root", default=None, help="folder of the runs (default <runs root>/pretrain: "
                                                   "runs/pretrain or $MSKFM_RUNS/pretrain)")


def _import_args(p: argparse.ArgumentParser) -> None:
    from .importers import FORMATS

    p.add_argument("source", help="checkpoint file (model.pt, .safetensors) or hf://owner/repo/path/to/file")
    p.add_argument("--format", required=True, choices=sorted(FORMATS), help="the checkpoint's upstream format")
    p.add_argument("--plane", required=True, choices=PLANES, help="plane the model was trained on")
    p.add_argument("--to", required=True, help="destination folder, s3:// URL or hf://owner/repo")
    p.add_argument("--overwrite", action="store_true", help="replace an existing backbone there")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change the format's published config for a checkpoint trained otherwise "
                   "(repeatable), e.g. --set model_channels=32 --set preprocessing.shape=[16,128,128]")


COMMANDS: dict[str, Command] = {
    "run": Command(_run_args, cmd_run, "train the backbones of a config (resumes a run of the same name)"),
    "publish": Command(_publish_args, cmd_publish, "publish the trained backbones of a run"),
    "import": Command(_import_args, cmd_import, "import a published foundation model's checkpoint as a backbone"),
    **RECON_COMMANDS,
}


def build_parser() -> argparse.ArgumentParser:
    return build_cli("pretrain", __doc__.splitlines()[0], COMMANDS)


def main(argv: list[str] | None = None) -> int:
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    # deterministic failures: the same one line (exit 2) under every launcher
    return run_cli(build_parser(), COMMANDS, argv,
                   errors=(NonFiniteLossError, ShardError, FileNotFoundError, FileExistsError))


if __name__ == "__main__":
    sys.exit(main())
