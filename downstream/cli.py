"""``downstream`` command line: ``tasks`` lists the tasks, ``finetune --task NAME [key=value ...]`` runs one.

Subcommands are entries of :data:`COMMANDS` (name -> ``Command(add_arguments, run, help)``, the
pattern of every mskfm CLI: ``shards.config.run_cli``), so sweeps, studies and reports plug in beside
``finetune``.
"""

from __future__ import annotations

import argparse
import logging
import re
from typing import Sequence

from shards.config import Command, ConfigError, build_cli, run_cli

from .recon.cli import RECON_COMMANDS
from .tasks import TASKS_DIR, describe_tasks, describe_vocabulary
from .tuning import Interrupted


def _tasks_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks-dir", default=str(TASKS_DIR), help="folder of task YAMLs")
    p.add_argument("--shards", default=None, help="also list the anatomies, labels and structures this shard set offers")


def _tasks_run(args: argparse.Namespace) -> int:
    if args.shards:
        from shards.dataset import dataset_of
        from shards.manifest import load_manifest

        try:
            manifest = load_manifest(args.shards)
        except FileNotFoundError as exc:
            raise ConfigError(str(exc)) from None
        for line in describe_vocabulary(dataset_of(manifest)):
            print(line)
        print()
    for line in describe_tasks(args.tasks_dir):
        print(line)
    return 0


def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="task name (configs/tasks/<name>.yaml) or a YAML path")
    p.add_argument("--run-dir", default=None, help="run folder (default runs/finetune/<task>-<time>)")
    p.add_argument("--from-sweep", default=None, help="a sweep run folder: train its best head (best.json)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=20")


def _finetune_run(args: argparse.Namespace) -> int:
    from .finetune import run_finetune

    overrides = list(args.overrides)
    if args.from_sweep:
        from .sweep import from_sweep_overrides

        overrides = from_sweep_overrides(args.from_sweep, args.task) + overrides
    result = run_finetune(args.task, overrides, run_dir=args.run_dir)
    print(result["table"])
    return 0


def _features_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="task name (configs/tasks/<name>.yaml) or a YAML path")
    p.add_argument("--run-dir", default=None, help="run folder (default runs/features/<task>)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. features.workers=4 cache_dir=s3://b/cache")


def _features_run(args: argparse.Namespace) -> int:
    from .extract import run_features

    s = run_features(args.task, args.overrides, args.run_dir)
    print(f"task {s['task']}: {s['studies']} studies, {s['cache_misses']} cache entries computed "
          f"({s['parts_written']} parts on {s['workers']} workers) in {s['seconds']:.1f} s -> {s['run_dir']}")
    return 0


def _sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="task name (configs/tasks/<name>.yaml) or a YAML path")
    p.add_argument("--space", required=True, help="sweep config, e.g. configs/sweeps/knee-dx-head.yaml")
    p.add_argument("--run-dir", default=None, help="run folder (default runs/sweep/<task>-sweep); rerun to resume")
    p.add_argument("overrides", nargs="*", help="sweep keys (num_samples=8) or task keys (train.epochs=20)")


def _sweep_run(args: argparse.Namespace) -> int:
    from .sweep import load_sweep, run_sweep

    result = run_sweep(load_sweep(args.space, args.task, args.overrides), args.run_dir)
    print(result["trials"].to_string(index=False))
    best = result["best"]
    print(f"best ({best['metric']} {best['value']:.3f}): {best['params']} -> {result['run_dir']}/best.json\n"
          f"train and test it: downstream finetune --task {args.task} --from-sweep {result['run_dir']}")
    return 0


def _study_args(p: argparse.ArgumentParser) -> None:
    from .studies.config import KINDS

    p.add_argument("kind", choices=KINDS)
    p.add_argument("--space", default=None, help="study grid (default configs/sweeps/<kind>.yaml)")
    p.add_argument("--quick", action="store_true", help="the reduced grid of the config's quick: block")
    p.add_argument("--make-backbones", action="store_true",
                   help="pretrain (small, with `pretrain run`'s engine) the grid's backbones that are not published yet")
    p.add_argument("--run-dir", default=None, help="run folder (default runs/study/<kind>); rerun to resume")
    p.add_argument("overrides", nargs="*", help="study keys, e.g. seeds=[0,1] task=ankle-dx")


def _study_run(args: argparse.Namespace) -> int:
    from .studies import run_study
    from .studies.config import load_study

    summary = run_study(load_study(args.kind, args.space, args.overrides, args.quick), args.run_dir,
                        args.make_backbones)
    print(f"{summary['n_trials']} trials ({summary['n_errors']} failed) -> {summary['report']} and {summary['html']}")
    return 0


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a study run folder (with config.yaml and trials.csv)")


def _report_run(args: argparse.Namespace) -> int:
    from .studies import study_report

    md, page = study_report(args.run)
    print(f"{md}\n{page}")
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a finetune run folder (or its model/ folder)")
    p.add_argument("--to", required=True, help="destination: a folder, s3://bucket/prefix or hf://owner/repo")
    p.add_argument("--overwrite", action="store_true", help="replace an existing task model there")


def _export_run(args: argparse.Namespace) -> int:
    from .task_model import export_task_model

    print(f"task model exported to {export_task_model(args.run, args.to, args.overwrite)}")
    return 0


def _split_inputs(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """Positional inputs vs key=value overrides (a key is a dotted lower-case name)."""
    overrides = [i for i in items if re.match(r"^[a-z_][a-z0-9_.]*=", i)]
    return [i for i in items if i not in overrides], overrides


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="task model: folder, finetune run folder, s3:// or hf:// URL")
    p.add_argument("--out", required=True, help="output folder (predictions.csv, segmentations/, predict.json)")
    p.add_argument("--config", default=None, help="predict config (default configs/predict/default.yaml)")
    p.add_argument("inputs", nargs="+", help="a shard folder or URL, a DICOM folder, or NIfTI files; then "
                                             "key=value overrides, e.g. workers=2 split=test")
    p.set_defaults(overrides=[])


def _predict_run(args: argparse.Namespace) -> int:
    from .predict import load_predict_config, run_predict

    inputs, overrides = _split_inputs(args.inputs)
    overrides += args.overrides
    summary = run_predict(args.model, inputs, args.out, load_predict_config(args.config, overrides))
    print(f"{summary['n_predicted']} of {summary['n_studies']} studies predicted ({summary['n_failed']} failed, "
          f"listed in predictions.csv), {summary['studies_per_s']} studies/s -> {args.out}/predictions.csv")
    for f in summary["failed"][:10]:
        print(f"  failed {f['key']}: {f['error']}")
    return 0


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="task model: folder, finetune run folder, s3:// or hf:// URL")
    p.add_argument("--shards", required=True, help="labelled shard set (folder or URL), e.g. an external cohort")
    p.add_argument("--out", default=None, help="output folder (default runs/evaluate/<task>-<shard set>)")
    p.add_argument("--config", default=None, help="predict config (default configs/predict/default.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. split=test workers=2")


def _evaluate_run(args: argparse.Namespace) -> int:
    from .evaluate import run_evaluate
    from .predict import load_predict_config

    result = run_evaluate(args.model, args.shards, args.out, load_predict_config(args.config, args.overrides))
    print(result["table"])
    return 0


def _seg3d_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="evaluation config, e.g. configs/seg3d/eval-demo.yaml")
    p.add_argument("--run-dir", default=None, help="run folder (default runs/seg3d/<name>)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model=hub/seg3d-knee-sag")


def _seg3d_run(args: argparse.Namespace) -> int:
    from .seg3d.evaluate import run_seg_eval

    result = run_seg_eval(args.config, args.overrides, args.run_dir)
    print(f"{result['run_dir']}/report.md")
    return 0


def _prompt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="box-prompt study config, e.g. configs/seg3d/prompt-tiny.yaml")
    p.add_argument("--run-dir", default=None, help="run folder (default runs/seg3d/<name>)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. jitter=0.1")


def _prompt_run(args: argparse.Namespace) -> int:
    from .seg3d.prompted import run_prompt_study

    result = run_prompt_study(args.config, args.overrides, args.run_dir)
    print(f"{result['run_dir']}/report.md")
    return 0


COMMANDS: dict[str, Command] = {
    "tasks": Command(_tasks_args, _tasks_run, "list the tasks in configs/tasks (--shards: and what a shard set offers)"),
    "finetune": Command(_finetune_args, _finetune_run, "train and evaluate a task's head and its baselines"),
    "features": Command(_features_args, _features_run, "fill a task's feature cache (local or s3://), on "
                        "features.workers Ray workers"),
    "sweep": Command(_sweep_args, _sweep_run, "Ray Tune sweep of a task's head (ASHA), best config to the run folder"),
    "study": Command(_study_args, _study_run, "a study grid with seeds (label-efficiency, transfer, robustness, "
                                              "multi-anatomy) ending in a report"),
    "report": Command(_report_args, _report_run, "render a study run into report.md and report.html"),
    "export": Command(_export_args, _export_run, "copy a finetune run's task model to a folder, s3:// or hf://"),
    "predict": Command(_predict_args, _predict_run, "apply a task model to shards, a DICOM folder or NIfTI files"),
    "evaluate": Command(_evaluate_args, _evaluate_run, "metrics with intervals of a task model on another labelled "
                                                       "shard set (external test), no retraining"),
    **RECON_COMMANDS,
    "seg3d-eval": Command(_seg3d_args, _seg3d_run, "score a 3D segmentation model on internal and external test "
                                                  "sets (native grid, per structure and region, intervals)"),
    "prompt-seg": Command(_prompt_args, _prompt_run, "box-prompted segmentation study (SAM protocol): zero-shot vs "
                                                     "fine-tuned vs prompt-free on the same test studies"),
}


def build_parser() -> argparse.ArgumentParser:
    return build_cli("downstream", __doc__.splitlines()[0], COMMANDS)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_cli(build_parser(), COMMANDS, argv, interrupts=(Interrupted,))
