"""Ingest fastMRI-format HDF5 files into reconstruction shards (kind ``recon``), one sample per slice.

A fastMRI file holds ``kspace`` (slices, coils, rows, cols) complex (single-coil files: (slices, rows,
cols)), optionally ``reconstruction_rss`` (slices, r, c) and ``mask`` (cols,) for prospective data,
``ismrmrd_header`` (XML with the encoded and reconstructed matrix sizes) and attributes such as
``acquisition``, ``max``, ``patient_id``. Each slice is checked before it is written: finite k-space,
k-space grid equal to the header's encoded matrix, target equal to the header's recon matrix; an
error names the file and the slice.

De-identified like DICOM (:mod:`.deid`): study and patient keys are keyed hashes (HMAC with the
dataset's salt) of the file name and ``patient_id``; no file name, path, header text or attribute
other than the acquisition (mapped onto a closed vocabulary) and ``max`` reaches a shard or the
manifest. At the end ``shards scan-phi`` runs over the shard folder; its result goes to
``runs/ingest/<name>/ingest_report.json`` and any hit makes the exit code 1.

    shards ingest fastmri <dir> --out <shards> [anatomy=knee] [splits.val=0.2 ...]

Registered as the ``fastmri`` kind of :data:`shards.ingest.cli.INGESTERS`.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from ..config import ConfigError, save_config, to_dict
from ..dataset import DatasetDeclaration, load_declaration
from ..manifest import load_manifest
from ..runs import runs_root, write_metrics
from ..splits import assign_split
from ..writer import ShardWriter
from .deid import DeidConfig, Pseudonymizer, load_salt

ISMRMRD_NS = {"ismrmrd": "http://www.ismrm.org/ISMRMRD"}
# fastMRI acquisition names (knee CORPD_FBK, brain AXT1POST...): the closed contrast vocabulary
CONTRASTS = ("PD", "PDFS", "T1", "T1PRE", "T1POST", "T2", "T2FS", "FLAIR", "STIR", "DWI", "GRE")


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
    """(contrast, orientation) from a fastMRI acquisition name, e.g. CORPD_FBK -> (PD, cor);
    a contrast outside :data:`CONTRASTS` is ``unknown`` (the attribute may hold any text)."""
    acq = (acquisition.decode("ascii", "replace") if isinstance(acquisition, bytes) else str(acquisition)).upper()
    orientation = next((o.lower() for o in ("AX", "COR", "SAG") if acq.startswith(o)), "unknown")
    body = re.sub(r"^(AX|COR|SAG)", "", acq).split("_")[0]
    return (body if body in CONTRASTS else "unknown"), orientation


def _anatomy_of(path: Path, given: str | None) -> str:
    if given:
        return given
    m = re.match(r"file_(brain|knee|prostate|breast)", path.stem)
    return m.group(1) if m else "knee"


def _ids(f: h5py.File, path: Path, pseudo: Pseudonymizer) -> tuple[str, str]:
    """(study key, patient key): keyed hashes of the file name and of ``patient_id`` (else the file)."""
    study = pseudo.key("s", pseudo.ident("fastmri-file", path.stem))
    patient = f.attrs.get("patient_id")
    patient = patient.decode("utf-8", "replace") if isinstance(patient, bytes) else str(patient or "")
    return study, (pseudo.key("p", pseudo.ident("patient", patient)) if patient.strip() else
                   study.replace("s-", "p-", 1))


def _slice_key(study: str, index: int) -> str:
    return f"{study}-{index:03d}"


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


def slice_sample(f: h5py.File, path: Path, index: int, info: dict, anatomy: str, ids: tuple[str, str]) -> dict:
    """One decoded recon sample for slice ``index``, checked; ``ids`` = (study key, patient key)."""
    k = np.asarray(f["kspace"][index], np.complex64)
    if k.ndim == 2:
        k = k[None]
    if not np.isfinite(k).all():
        raise FastMRIError(f"{path}: slice {index}: kspace contains NaN or infinite values")
    sample = {"__key__": _slice_key(ids[0], index), "kspace": k}
    if "reconstruction_rss" in f:
        target = np.asarray(f["reconstruction_rss"][index], np.float32)
        if not np.isfinite(target).all():
            raise FastMRIError(f"{path}: slice {index}: reconstruction_rss contains NaN or infinite values")
        sample["target"] = target
    if "mask" in f:
        sample["mask"] = np.broadcast_to(np.asarray(f["mask"]) > 0, k.shape[-2:]).astype(np.uint8)
    attrs = dict(f.attrs)
    contrast, orientation = acquisition_meta(attrs.get("acquisition", "unknown"))
    acquisition = f"{orientation.upper()}{contrast}" if "unknown" not in (contrast, orientation) else "unknown"
    sample["meta"] = {"anatomy": anatomy, "contrast": contrast, "orientation": orientation,
                      "coils": int(k.shape[0]), "acquisition": acquisition, "study": ids[0],
                      "patient": ids[1], "slice": index, "source": "fastmri",
                      "max": float(attrs["max"]) if "max" in attrs else None,
                      "encoded": list(info["grid"]), "recon": list(info.get("recon", info["grid"]))}
    return sample


def ingest_fastmri(src: str | Path, out: str | Path, anatomy: str | None = None,
                   fractions: dict[str, float] | None = None, seed: int = 0, max_count: int = 256,
                   deid: DeidConfig | None = None, info: dict | None = None,
                   dataset: DatasetDeclaration | None = None) -> dict:
    """Write every slice of every ``*.h5`` under ``src`` to recon shards in ``out``; returns the manifest.

    Keys are salted (``deid``'s salt, ``$MSKFM_DEID_SALT`` by default); ``info`` goes to the manifest
    as is (no paths). With a ``dataset`` declaration (recorded in the manifest) a file of an undeclared
    anatomy stops the ingest naming the file; finished shards stay."""
    pseudo = Pseudonymizer(load_salt(deid or DeidConfig()))
    files = sorted(Path(src).rglob("*.h5"))
    if not files:
        raise FastMRIError(f"no fastMRI .h5 files under {src}")
    fractions = fractions or {"train": 0.8, "val": 0.2}
    # a keyed hash of a constant (never the salt): a resume with another salt is refused, like DICOM's
    info = {"source": "fastmri", **(info or {}), "deid_key_check": pseudo.digest("key-check", "mskfm")[:16]}
    if dataset is not None:
        info["dataset"] = dataset.to_dict()
    with ShardWriter(out, kind="recon", max_count=max_count, info=info) as writer:
        for path in tqdm(files, desc="fastmri", unit="file"):
            f, finfo = read_file(path)
            with f:
                ids = _ids(f, path, pseudo)
                if dataset is not None and _anatomy_of(path, anatomy) not in dataset.anatomies:
                    raise FastMRIError(f"{path.name}: anatomy '{_anatomy_of(path, anatomy)}' is not declared; "
                                       f"anatomies: {', '.join(dataset.anatomies)} (set anatomy= or declare it)")
                for index in range(finfo["slices"]):
                    if writer.done(_slice_key(ids[0], index)):
                        continue
                    sample = slice_sample(f, path, index, finfo, _anatomy_of(path, anatomy), ids)
                    split = assign_split(ids[1], fractions, seed)
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
    dataset: str = ""         # dataset declaration YAML (docs/datasets.md): the anatomies files may have
    deid: DeidConfig = field(default_factory=DeidConfig)  # the salt (dates/free text: nothing kept)

    def validate(self) -> None:
        if not self.source or not self.out:
            raise ConfigError("shards ingest fastmri: give the input folder and --out")
        self.deid.validate()


def _manifest_info(cfg: FastMRIIngestConfig) -> dict:
    """The ingest config as the manifest records it: no paths, no salt file."""
    conf = to_dict(cfg)
    for key in ("source", "out", "name"):
        conf.pop(key, None)
    conf["deid"].pop("salt_file", None)
    conf["dataset"] = Path(conf["dataset"]).name if conf["dataset"] else ""
    return {"name": cfg.name or Path(cfg.out).name, "ingest_config": conf}


def run_fastmri(cfg: FastMRIIngestConfig) -> int:
    """Ingest, scan the shards for the source's identifying values, write
    ``runs/ingest/<name>/{config.yaml, metrics.json, ingest_report.json}``; 1 on any PHI hit."""
    from ..phi_scan import format_scan
    from .common import scan_output

    dataset = load_declaration(cfg.dataset) if cfg.dataset else None
    manifest = ingest_fastmri(cfg.source, cfg.out, cfg.anatomy or None, dict(cfg.splits), cfg.split_seed,
                              cfg.shard_max_count, cfg.deid, _manifest_info(cfg), dataset)
    counts = {s: v["n_samples"] for s, v in manifest["splits"].items()}
    scan = scan_output(cfg.out, cfg.source, [], free_text=False)
    run_dir = runs_root() / "ingest" / (cfg.name or Path(cfg.out).name)
    save_config(cfg, run_dir / "config.yaml")
    write_metrics(run_dir, {"slices": counts, "stats": manifest["stats"], "phi_hits": scan["n_hits"]}, default=None)
    (run_dir / "ingest_report.json").write_text(json.dumps({"command": "fastmri", "slices": counts,
                                                            "phi_scan": scan}, indent=1))
    print(f"fastmri -> {cfg.out}: {counts} slices")
    print(f"scan-phi: could not run ({scan['error']})" if "error" in scan else format_scan(scan))
    return 1 if scan["n_hits"] or "error" in scan else 0
