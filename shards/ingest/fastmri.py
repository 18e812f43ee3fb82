"""Ingest fastMRI-format HDF5 files into reconstruction shards (kind ``recon``), one sample per slice.

A fastMRI file holds ``kspace`` (slices, coils, rows, cols) complex (single-coil files: (slices, rows,
cols)), optionally ``reconstruction_rss`` (slices, r, c) and ``mask`` (cols,) for prospective data,
``ismrmrd_header`` (XML with the encoded and reconstructed matrix sizes) and attributes such as
``acquisition``, ``max``, ``patient_id``. Each slice is checked before it is written: finite k-space,
k-space grid equal to the header's encoded matrix, target equal to the header's recon matrix; an
error names the file and the slice.

    shards ingest fastmri <dir> --out <shards> [anatomy=knee] [splits.val=0.2 ...]

Registered as the ``fastmri`` kind of :data:`shards.ingest.cli.INGESTERS`.
"""

from __future__ import annotations

import hashlib
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from ..config import ConfigError, save_config
from ..manifest import load_manifest
from ..runs import write_metrics
from ..splits import assign_split
from ..writer import ShardWriter

ISMRMRD_NS = {"ismrmrd": "http://www.ismrm.org/ISMRMRD"}


class FastMRIError(ValueError):
    """A fastMRI file or slice that cannot be ingested; the message names the file and slice."""


def header_sizes(xml: bytes | str, path: str) -> dict:
    """Encoded and recon matrix sizes ``{"encoded": (x, y), "recon": (x, y)}`` from the ISMRMRD header."""
    try:
        root = ET.fromstring(xml)
        out = {}
        for name, tag in (("encoded", "encodedSpace"), ("recon", "reconSpace")):
            node = root.find(f"ismrmrd:encoding/ismrmrd:{tag}/ismrmrd:matrixSize", ISMRMRD_NS)
            out[name] = (int(node.find("ismrmrd:x", ISMRMRD_NS).text), int(node.find("ismrmrd:y", ISMRMRD_NS).text))
        return out
    except (ET.ParseError, AttributeError, TypeError, ValueError) as exc:
        raise FastMRIError(f"{path}: unreadable ismrmrd_header ({type(exc).__name__}: {exc})") from None


def acquisition_meta(acquisition: str) -> tuple[str, str]:
    """(contrast, orientation) from a fastMRI acquisition name, e.g. CORPD_FBK -> (PD, cor)."""
    acq = acquisition.upper()
    orientation = next((o.lower() for o in ("AX", "COR", "SAG") if acq.startswith(o)), "unknown")
    body = re.sub(r"^(AX|COR|SAG)", "", acq).split("_")[0]
    return (body or "unknown"), orientation


def _anatomy_of(path: Path, given: str | None) -> str:
    if given:
        return given
    m = re.match(r"file_(brain|knee|prostate|breast)", path.stem)
    return m.group(1) if m else "knee"


def _slice_key(path: Path, index: int) -> str:
    digest = hashlib.sha256(path.stem.encode()).hexdigest()[:12]
    return f"fm-{digest}-{index:03d}"


def read_file(path: Path) -> tuple[h5py.File, dict]:
    """Open a fastMRI file and check its layout against its header; returns (file, info)."""
    f = h5py.File(path, "r")
    try:
        if "kspace" not in f:
            raise FastMRIError(f"{path}: no 'kspace' dataset (found {sorted(f.keys())})")
        k = f["kspace"]
        if k.ndim not in (3, 4) or not np.issubdtype(k.dtype, np.complexfloating):
            raise FastMRIError(f"{path}: kspace must be complex (slices, [coils,] rows, cols), got {k.dtype} {k.shape}")
        info = {"slices": k.shape[0], "coils": k.shape[1] if k.ndim == 4 else 1, "grid": tuple(k.shape[-2:])}
        if "ismrmrd_header" in f:
            sizes = header_sizes(f["ismrmrd_header"][()], str(path))
            if tuple(sizes["encoded"]) != info["grid"]:
                raise FastMRIError(f"{path}: kspace grid {info['grid']} disagrees with the header's encoded "
                                   f"matrix {sizes['encoded']}")
            info["recon"] = tuple(sizes["recon"])
        rss = f.get("reconstruction_rss")
        if rss is not None:
            if rss.shape[0] != info["slices"]:
                raise FastMRIError(f"{path}: reconstruction_rss has {rss.shape[0]} slices, kspace {info['slices']}")
            if "recon" in info and tuple(rss.shape[-2:]) != info["recon"]:
                raise FastMRIError(f"{path}: reconstruction_rss {tuple(rss.shape[-2:])} disagrees with the header's "
                                   f"recon matrix {info['recon']}")
        if "mask" in f and f["mask"].shape[-1] != info["grid"][-1]:
            raise FastMRIError(f"{path}: mask of {f['mask'].shape[-1]} columns, kspace has {info['grid'][-1]}")
        return f, info
    except Exception:
        f.close()
        raise


def slice_sample(f: h5py.File, path: Path, index: int, info: dict, anatomy: str) -> dict:
    """One decoded recon sample for slice ``index``, checked."""
    k = np.asarray(f["kspace"][index], np.complex64)
    if k.ndim == 2:
        k = k[None]
    if not np.isfinite(k).all():
        raise FastMRIError(f"{path}: slice {index}: kspace contains NaN or infinite values")
    sample = {"__key__": _slice_key(path, index), "kspace": k}
    if "reconstruction_rss" in f:
        target = np.asarray(f["reconstruction_rss"][index], np.float32)
        if not np.isfinite(target).all():
            raise FastMRIError(f"{path}: slice {index}: reconstruction_rss contains NaN or infinite values")
        sample["target"] = target
    if "mask" in f:
        sample["mask"] = np.broadcast_to(np.asarray(f["mask"]) > 0, k.shape[-2:]).astype(np.uint8)
    attrs = dict(f.attrs)
    acquisition = str(attrs.get("acquisition", "unknown"))
    contrast, orientation = acquisition_meta(acquisition)
    patient = str(attrs.get("patient_id", path.stem))
    sample["meta"] = {"anatomy": anatomy, "contrast": contrast, "orientation": orientation,
                      "coils": int(k.shape[0]), "acquisition": acquisition, "study": path.stem,
                      "patient": patient, "slice": index, "source": "fastmri", "file": path.name,
                      "max": float(attrs["max"]) if "max" in attrs else None,
                      "encoded": list(info["grid"]), "recon": list(info.get("recon", info["grid"]))}
    return sample


def ingest_fastmri(src: str | Path, out: str | Path, anatomy: str | None = None,
                   fractions: dict[str, float] | None = None, seed: int = 0, max_count: int = 256) -> dict:
    """Write every slice of every ``*.h5`` under ``src`` to recon shards in ``out``; returns the manifest."""
    files = sorted(Path(src).rglob("*.h5"))
    if not files:
        raise FastMRIError(f"no fastMRI .h5 files under {src}")
    fractions = fractions or {"train": 0.8, "val": 0.2}
    info = {"source": "fastmri", "input": str(Path(src).resolve())}
    with ShardWriter(out, kind="recon", max_count=max_count, info=info) as writer:
        for path in tqdm(files, desc="fastmri", unit="file"):
            f, finfo = read_file(path)
            with f:
                for index in range(finfo["slices"]):
                    if writer.done(_slice_key(path, index)):
                        continue
                    sample = slice_sample(f, path, index, finfo, _anatomy_of(path, anatomy))
                    split = assign_split(sample["meta"]["patient"], fractions, seed)
                    writer.write(sample | {"meta": sample["meta"] | {"split": split}}, split)
    return load_manifest(out)


@dataclass
class FastMRIIngestConfig:
    """``shards ingest fastmri <dir> --out <shards> [key=value ...]``."""

    source: str = ""          # folder of fastMRI .h5 files (searched recursively)
    out: str = ""             # recon shard folder (resumable: rerun to continue)
    name: str = ""            # run name; default: the shard folder's name
    anatomy: str = ""         # anatomy of every file; empty: from the file name (file_brain_...), else knee
    splits: dict[str, float] = field(default_factory=lambda: {"train": 0.8, "val": 0.2})
    split_seed: int = 0
    shard_max_count: int = 256

    def validate(self) -> None:
        if not self.source or not self.out:
            raise ConfigError("shards ingest fastmri: give the input folder and --out")


def run_fastmri(cfg: FastMRIIngestConfig) -> int:
    """Ingest, write ``runs/ingest/<name>/{config.yaml, metrics.json}``, print the split counts."""
    manifest = ingest_fastmri(cfg.source, cfg.out, cfg.anatomy or None, dict(cfg.splits), cfg.split_seed,
                              cfg.shard_max_count)
    counts = {s: v["n_samples"] for s, v in manifest["splits"].items()}
    run_dir = Path("runs") / "ingest" / (cfg.name or Path(cfg.out).name)
    save_config(cfg, run_dir / "config.yaml")
    write_metrics(run_dir, {"slices": counts, "stats": manifest["stats"]}, default=None)
    print(f"fastmri -> {cfg.out}: {counts} slices")
    return 0
