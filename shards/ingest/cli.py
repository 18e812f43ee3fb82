"""``shards ingest <kind> <dir> --out <shards> [--config YAML] [key=value ...]``.

Each kind is an entry of :data:`INGESTERS`: a config schema and a run function taking the
validated config and returning the exit code; :data:`INGEST` is the ``shards`` CLI's ``ingest``
command, with one subcommand per entry.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from ..config import Command, ConfigError, OverridesParser, build_cli, load_config, run_cli


def _resolve(target):
    """``"package.module:name"`` -> the object (imported only when a subcommand runs, so that
    ``shards --help`` does not import pydicom, nibabel and pandas)."""
    if not isinstance(target, str):
        return target
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Ingester:
    schema: type | str                      # config dataclass, or "module:Name"
    run: Callable[[object], int] | str      # validated config -> exit code, or "module:name"
    help: str
    source_help: str = "input folder"


INGESTERS: dict[str, Ingester] = {
    "dicom": Ingester("shards.ingest.config:DicomIngestConfig", "shards.ingest.dicom:ingest_dicom",
                      "DICOM export (any folder layout) -> de-identified study shards",
                      "folder of DICOM files (nested, with or without extension, DICOMDIR or not)"),
    "nifti": Ingester("shards.ingest.config:NiftiIngestConfig", "shards.ingest.nifti:ingest_nifti",
                      "NIfTI volumes (+ *_seg label maps) -> study shards",
                      "folder of .nii/.nii.gz volumes"),
    "fastmri": Ingester("shards.ingest.fastmri:FastMRIIngestConfig", "shards.ingest.fastmri:run_fastmri",
                        "fastMRI HDF5 files -> reconstruction shards (one sample per slice)",
                        "folder of fastMRI .h5 files (searched recursively)"),
}


def run_ingest(args: argparse.Namespace) -> int:
    ingester = INGESTERS[args.ingest_kind]
    overrides = list(args.overrides) + [f"source={args.source}", f"out={args.out}"]
    try:
        cfg = load_config(_resolve(ingester.schema), args.config, overrides)
        return _resolve(ingester.run)(cfg)
    except ConfigError as exc:  # e.g. no de-identification salt: nothing was read or written
        raise ConfigError(f"{args.ingest_kind}: {exc}") from exc


def add_ingest_arguments(ingest: argparse.ArgumentParser) -> None:
    """One ``ingest`` subcommand per entry of :data:`INGESTERS` (``args.ingest_kind`` names it)."""
    kinds = ingest.add_subparsers(dest="ingest_kind", required=True, parser_class=OverridesParser)
    for name, ingester in INGESTERS.items():
        sub = kinds.add_parser(name, help=ingester.help)
        sub.add_argument("source", help=ingester.source_help)
        sub.add_argument("--out", required=True, help="shard folder (resumable: rerun to continue)")
        sub.add_argument("--config", default=None, help=f"YAML, e.g. configs/shards/ingest-{name}.yaml")
        sub.add_argument("overrides", nargs="*", help="key=value overrides, e.g. joint=knee")


INGEST = Command(add_ingest_arguments, run_ingest, "bring real data in (de-identified, validated)")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m shards.ingest dicom <dir> --out <shards>`` (same as ``shards ingest ...``)."""
    parser = build_cli("shards", __doc__.splitlines()[0], {"ingest": INGEST})
    return run_cli(parser, {"ingest": INGEST}, ["ingest", *(argv if argv is not None else sys.argv[1:])])
