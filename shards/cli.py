"""``shards``: synthesize, build, verify and inspect WebDataset shards of MSK studies."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .config import Command, ConfigError, build_cli, load_config, run_cli
from .ingest.cli import INGEST
from .manifest import load_manifest, verify_shards
from .runs import run_dir, write_run

DEFAULT_CONFIG = "configs/shards/demo.yaml"


def _config(args):
    from .build import BuildConfig

    path = args.config if args.config else (DEFAULT_CONFIG if Path(DEFAULT_CONFIG).exists() else None)
    return load_config(BuildConfig, path, args.overrides)


def cmd_build(args) -> int:
    from .build import build_shards

    cfg = _config(args)
    t0 = time.time()
    manifest = build_shards(cfg, progress=not args.quiet)
    seconds = time.time() - t0
    n = manifest["stats"]["n_samples"]
    metrics = {"studies": n, "generated": manifest["generated"], "shards": len(manifest["shards"]),
               "bytes": sum(s["bytes"] for s in manifest["shards"]), "seconds": round(seconds, 2),
               "splits": {k: v["n_samples"] for k, v in manifest["splits"].items()}}
    write_run(run_dir("shards-build", cfg.name), cfg, metrics)
    print(f"wrote {n} studies in {len(manifest['shards'])} shards to {cfg.out} "
          f"({manifest['generated']} generated now, {seconds:.1f} s)")
    return 0


def cmd_synth(args) -> int:
    """Write a few synthetic studies as loose NIfTI/npy files plus a preview image."""
    from .export import export_study
    from .preview import save_preview
    from .synth import generate_study, iter_study_refs

    cfg = _config(args)
    out = Path(args.out)
    written = []
    for i, (plan, visit, key) in enumerate(iter_study_refs(cfg.synth)):
        if i >= args.n:
            break
        sample, _ = generate_study(cfg.synth, plan, visit, key)
        written.append(export_study(sample, out, args.format))
        save_preview(sample, out / f"{key}.png")
    print(f"wrote {len(written)} studies ({args.format}) with previews to {out}")
    return 0


def cmd_verify(args) -> int:
    manifest = load_manifest(args.shards)
    problems = verify_shards(manifest)
    for p in problems:
        print(f"FAIL {p}")
    n = len(manifest["shards"])
    print(f"{'OK' if not problems else 'FAILED'}: {n - len(problems)}/{n} shards match the manifest "
          f"(schema v{manifest['schema_version']}, {manifest['stats']['n_samples']} samples)")
    return 1 if problems else 0


def cmd_scan_phi(args) -> int:
    """Exit 0 when no identifying value of the export is in the shards (or what travels with them), else 1."""
    from .phi_scan import format_scan, scan_phi

    if not args.source and not args.table:
        raise ConfigError("scan-phi: give --source <export dir> (and/or --table) to gather identifying values from")
    if args.source and not Path(args.source).is_dir():
        raise FileNotFoundError(f"scan-phi: --source {args.source} is not a folder")
    result = scan_phi(args.shards, args.source, args.table, args.include,
                      ("free_text",) if args.allow_free_text else ())
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(format_scan(result))
    return 1 if result["n_hits"] else 0


def cmd_info(args) -> int:
    from .summary import format_summary

    manifest = load_manifest(args.shards)
    if args.json:
        print(json.dumps({k: v for k, v in manifest.items() if k != "shards"}, indent=1))
    else:
        print(format_summary(manifest))
    return 0


def _build_args(p) -> None:
    p.add_argument("--config", help=f"YAML under configs/shards (default {DEFAULT_CONFIG})")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. synth.n_patients=20")


def _synth_args(p) -> None:
    p.add_argument("--config")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--format", choices=("nifti", "npy"), default="nifti")
    p.add_argument("overrides", nargs="*")


def _verify_args(p) -> None:
    p.add_argument("shards", help="shard folder, manifest.json or s3:// URL")


def _scan_phi_args(p) -> None:
    p.add_argument("shards", help="shard folder or URL: every file in it is scanned")
    p.add_argument("--source", help="the export the shards came from (DICOM, fastMRI, NIfTI, tables)")
    p.add_argument("--table", action="append", default=[], help="a label/EHR table outside the export")
    p.add_argument("--include", action="append", default=[],
                   help="another file or folder that travels with the shards (model card, report)")
    p.add_argument("--allow-free-text", action="store_true",
                   help="shards ingested with deid.keep_free_text=true: whole free-text values are not hits")
    p.add_argument("--json", help="also write the result (no values, only where and what kind) here")


def cmd_export_nnunet(args) -> int:
    from .nnunet import export_nnunet

    joints = [j for j in (args.joints or "").split(",") if j] or None
    summary = export_nnunet(args.shards, args.out, args.plane, joints, args.dataset_id, args.name)
    print(f"wrote {summary['training']} training and {summary['test']} test cases, {summary['classes']} classes, "
          f"to {summary['folder']}")
    for u in summary["undeclared"]:
        print(f"  study {u['study']}: undeclared label values {u['values']} exported as 'ignore'")
    return 0


def _export_nnunet_args(p) -> None:
    p.add_argument("shards", help="shard folder or URL")
    p.add_argument("--out", required=True, help="nnU-Net raw folder (nnUNet_raw); Dataset<id>_<name>/ is written in it")
    p.add_argument("--plane", default="sag", choices=("sag", "cor", "ax"))
    p.add_argument("--joints", default=None, help="comma-separated anatomies (default: all in the manifest)")
    p.add_argument("--dataset-id", type=int, default=501)
    p.add_argument("--name", default="MSKSynth")


def _info_args(p) -> None:
    p.add_argument("shards")
    p.add_argument("--json", action="store_true")


COMMANDS: dict[str, Command] = {
    "build": Command(_build_args, cmd_build, "build shards from a config (resumable)"),
    "synth": Command(_synth_args, cmd_synth, "write a few synthetic studies as NIfTI/npy files + previews"),
    "ingest": INGEST,
    "verify": Command(_verify_args, cmd_verify, "check every shard's size and sha256 against the manifest"),
    "scan-phi": Command(_scan_phi_args, cmd_scan_phi, "look for the source export's identifying values in the shards"),
    "info": Command(_info_args, cmd_info, "print a dataset summary from the manifest"),
    "export-nnunet": Command(_export_nnunet_args, cmd_export_nnunet,
                             "write a plane of the shards in nnU-Net v2's raw layout (imagesTr, labelsTr, dataset.json)"),
}


def _global_args(parser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    return build_cli("shards", __doc__, COMMANDS, _global_args)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_cli(build_parser(), COMMANDS, argv, errors=(FileNotFoundError,))


if __name__ == "__main__":
    sys.exit(main())
