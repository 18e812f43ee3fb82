"""``downstream`` command line: ``tasks`` lists the tasks, ``finetune --task NAME [key=value ...]`` runs one.

Subcommands register themselves in :data:`COMMANDS` (name -> (add_arguments, run)), so sweeps,
studies and reports plug in beside ``finetune``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from shards.config import ConfigError

from .errors import FeatureError
from .tasks import TASKS_DIR, describe_tasks


def _tasks_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks-dir", default=str(TASKS_DIR), help="folder of task YAMLs")


def _tasks_run(args: argparse.Namespace) -> int:
    for line in describe_tasks(args.tasks_dir):
        print(line)
    return 0


def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="task name (configs/tasks/<name>.yaml) or a YAML path")
    p.add_argument("--run-dir", default=None, help="run folder (default runs/finetune/<task>-<time>)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=20")


def _finetune_run(args: argparse.Namespace) -> int:
    from .finetune import run_finetune

    result = run_finetune(args.task, args.overrides, run_dir=args.run_dir)
    print(result["table"])
    return 0


COMMANDS: dict[str, tuple[Callable, Callable, str]] = {
    "tasks": (_tasks_args, _tasks_run, "list the tasks in configs/tasks, one line each"),
    "finetune": (_finetune_args, _finetune_run, "train and evaluate a task's head and its baselines"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="downstream", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, _, help_text) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except (ConfigError, FeatureError) as exc:
        print(f"downstream {args.command}: error: {exc}", file=sys.stderr)
        return 2
