"""Export a shard set to nnU-Net v2's raw layout, so nnU-Net itself can be run as a baseline::

    Dataset<id>_<name>/
        dataset.json                 channel_names, labels (consecutive), numTraining, file_ending
        imagesTr/<study>_0000.nii.gz labelsTr/<study>.nii.gz     (the train and val splits)
        imagesTs/<study>_0000.nii.gz labelsTs/<study>.nii.gz     (the test split, for scoring)

One plane per export (nnU-Net trains one volume per case); labels are the ordered union of the
anatomies' structures (:mod:`shards.labelmaps`), so one nnU-Net learns every region. Label values an
anatomy does not declare become nnU-Net's ``ignore`` label (the highest value) and are listed in the
returned summary, study by study. Images carry the plane's spacing and orientation (:func:`shards.export.plane_affine`).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from .config import UserError
from .export import plane_affine
from .labelmaps import structure_tables, to_classes, undeclared_values, union_structures
from .manifest import load_manifest
from .reader import iter_samples

SPLIT_FOLDERS = {"train": "Tr", "val": "Tr", "test": "Ts"}


def export_nnunet(source: str, out: str | Path, plane: str = "sag", joints: list[str] | None = None,
                  dataset_id: int = 501, name: str = "MSKSynth") -> dict:
    """Write the raw dataset under ``out``; returns a summary (folder, counts, undeclared values)."""
    if not 1 <= dataset_id <= 999:
        raise UserError(f"nnU-Net dataset ids are 1..999, got {dataset_id}")
    manifest = load_manifest(source)
    joints = joints or sorted(manifest.get("stats", {}).get("joint", {})) or None
    if not joints:
        raise UserError(f"{source}: name the anatomies to export (--joints); the manifest lists none")
    tables = structure_tables(manifest, joints)
    classes = union_structures(tables)
    ignore = len(classes) + 1
    root = Path(out) / f"Dataset{dataset_id:03d}_{name}"
    counts, undeclared = {"Tr": 0, "Ts": 0}, []
    fields = (plane, f"{plane}.seg", "meta")
    for split, suffix in SPLIT_FOLDERS.items():
        if split not in manifest.get("splits", {}):
            continue
        (root / f"images{suffix}").mkdir(parents=True, exist_ok=True)
        (root / f"labels{suffix}").mkdir(parents=True, exist_ok=True)
        for sample in iter_samples(source, split, fields, require=fields[:2], joints=joints):
            key, meta = sample["__key__"], sample["meta"]
            declared = meta.get("structures") or tables[meta["joint"]]
            seg = np.asarray(sample[f"{plane}.seg"])
            if bad := undeclared_values(seg, declared):
                undeclared.append({"study": key, "values": bad})
            labels = to_classes(seg, declared, classes, ignore_index=ignore).astype(np.uint8)
            affine = plane_affine(plane, meta["planes"][plane]["spacing"])
            nib.save(nib.Nifti1Image(np.asarray(sample[plane], np.float32), affine),
                     root / f"images{suffix}" / f"{key}_0000.nii.gz")
            nib.save(nib.Nifti1Image(labels, affine), root / f"labels{suffix}" / f"{key}.nii.gz")
            counts[suffix] += 1
    if not counts["Tr"]:
        raise UserError(f"{source}: no train/val {plane} study with a label map of {joints}")
    labels = {"background": 0, **{c: k for k, c in enumerate(classes, start=1)}}
    if undeclared:
        labels["ignore"] = ignore
    dataset = {"channel_names": {"0": "MRI"}, "labels": labels, "numTraining": counts["Tr"],
               "file_ending": ".nii.gz", "name": name, "description": f"mskfm shards {plane} plane, anatomies {joints}"}
    (root / "dataset.json").write_text(json.dumps(dataset, indent=1))  # last: a complete export has it
    return {"folder": str(root), "training": counts["Tr"], "test": counts["Ts"], "classes": len(classes),
            "undeclared": undeclared}
