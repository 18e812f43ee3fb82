"""``shards ingest <kind> <dir> --out <shards> [--config YAML] [key=value ...]``.

Each kind is an entry of :data:`INGESTERS`: a config schema and a run function taking the
validated config and returning the exit code. Another kind (e.g. ``fastmri``) registers itself with
:func:`register`; :func:`add_ingest_parsers` builds one subcommand per entry.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from ..config import ConfigError, load_config


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


class _OverridesParser(argparse.ArgumentParser):
    """Lets ``key=value`` overrides come after options (``<dir> --out X joint=knee``): argparse
    would otherwise leave positionals that follow an option unrecognised."""

    def parse_known_args(self, args=None, namespace=None):
        ns, extras = super().parse_known_args(args, namespace)
        if hasattr(ns, "overrides"):
            pairs = [a for a in extras if "=" in a and not a.startswith("-")]
            ns.overrides = list(ns.overrides or []) + pairs
            extras = [a for a in extras if a not in pairs]
        return ns, extras


def register(name: str, ingester: Ingester) -> None:
    """Add an ingest kind (call before :func:`add_ingest_parsers`)."""
    INGESTERS[name] = ingester


def run_ingest(args: argparse.Namespace) -> int:
    ingester = INGESTERS[args.ingest_kind]
    overrides = list(args.overrides) + [f"source={args.source}", f"out={args.out}"]
    try:
        cfg = load_config(_resolve(ingester.schema), args.config, overrides)
    except ConfigError as exc:
        print(f"shards ingest {args.ingest_kind}: {exc}")
        return 2
    try:
        return _resolve(ingester.run)(cfg)
    except ConfigError as exc:  # e.g. no de-identification salt: nothing was read or written
        print(f"shards ingest {args.ingest_kind}: {exc}")
        return 2


def add_ingest_parsers(subparsers) -> argparse.ArgumentParser:
    """Add ``ingest`` and one subcommand per registered kind to a CLI's ``add_subparsers()``.

    Each subcommand sets ``func=run_ingest`` (call ``args.func(args)``; it returns the exit code).
    """
    ingest = subparsers.add_parser("ingest", help="bring real data in (de-identified, validated)")
    kinds = ingest.add_subparsers(dest="ingest_kind", required=True, parser_class=_OverridesParser)
    for name, ingester in INGESTERS.items():
        sub = kinds.add_parser(name, help=ingester.help)
        sub.add_argument("source", help=ingester.source_help)
        sub.add_argument("--out", required=True, help="shard folder (resumable: rerun to continue)")
        sub.add_argument("--config", default=None, help=f"YAML, e.g. configs/shards/ingest-{name}.yaml")
        sub.add_argument("overrides", nargs="*", help="key=value overrides, e.g. joint=knee")
        sub.set_defaults(func=run_ingest)
    return ingest


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m shards.ingest dicom <dir> --out <shards>`` (same as ``shards ingest ...``)."""
    parser = argparse.ArgumentParser(prog="shards")
    add_ingest_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["ingest", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)
