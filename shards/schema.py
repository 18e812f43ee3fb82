"""Sample schema v1: what one study (or one reconstruction slice) looks like in a shard.

A decoded *study* sample is a dict::

    {"__key__": "s-3f2a...",            # de-identified study id (no dots: WebDataset splits on them)
     "meta": {...},                      # joint, site, field strength, vendor, split, planes{...}
     "sag": float32 (slices, rows, cols), "cor": ..., "ax": ...,   # any plane may be absent
     "sag.seg": uint8 label map on the sag grid (optional), ...
     "labels": {"acl": 1, "pcl": 0, "effusion": None, ...},        # None = unknown
     "ehr": {...}}                       # optional structured record

A decoded *reconstruction* sample (one slice) is ``{"__key__", "meta", "kspace": complex64
(coils, rows, cols), "target": float32 (rows, cols)}``. On disk each field is one tar member named
``<key>.<field>.<ext>`` (``.npy`` for arrays, ``.json`` for dicts).
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from .config import UserError

SCHEMA_VERSION = 1
KNOWN_SCHEMA_VERSIONS = (1,)

PLANES = ("sag", "cor", "ax")
PLANE_NAMES = {"sag": "sagittal", "cor": "coronal", "ax": "axial"}
JOINTS = ("knee", "ankle", "shoulder")

LABELS: dict[str, tuple[str, ...]] = {
    "knee": ("acl", "pcl", "medial_meniscus", "lateral_meniscus", "mcl", "lcl",
             "cartilage_bml", "effusion"),
    "ankle": ("atfl", "cfl", "achilles", "osteochondral"),
    "shoulder": ("supraspinatus", "infraspinatus", "subscapularis", "biceps_long_head",
                 "ac_joint", "glenohumeral", "biceps_effusion", "subacromial_bursa"),
    "hip": (), "elbow": (), "wrist": (),
}

# Label-map structures per joint; index 0 is background. Order = integer value in ``<plane>.seg``.
STRUCTURES: dict[str, tuple[str, ...]] = {
    "knee": ("background", "femur", "tibia", "patella", "fibula", "femoral_cartilage",
             "tibial_cartilage", "medial_meniscus", "lateral_meniscus", "acl", "pcl", "mcl",
             "lcl", "fluid", "fat", "muscle"),
    "ankle": ("background", "tibia", "fibula", "talus", "calcaneus", "talar_cartilage", "atfl",
              "cfl", "achilles", "fluid", "fat", "muscle"),
    "shoulder": ("background", "humerus", "glenoid", "acromion", "clavicle",
                 "humeral_cartilage", "labrum", "supraspinatus", "infraspinatus",
                 "subscapularis", "biceps_tendon", "bursa", "fluid", "fat", "muscle"),
    # more regions (label maps only, opt-in: shards/synth/regions.py)
    "hip": ("background", "femur", "femoral_head", "femoral_head_cartilage", "acetabulum", "acetabular_cartilage",
            "ilium", "ischium", "pubis", "greater_trochanter", "labrum", "ligamentum_teres", "iliopsoas",
            "gluteus_medius", "sciatic_nerve", "fluid", "fat", "muscle"),
    "elbow": ("background", "humerus", "capitellum", "trochlea", "radius", "ulna", "humeral_cartilage", "ucl",
              "radial_collateral", "annular_ligament", "biceps_tendon", "triceps_tendon", "common_extensor",
              "common_flexor", "ulnar_nerve", "fluid", "fat", "muscle"),
    "wrist": ("background", "radius", "ulna", "tfcc", "scaphoid", "lunate", "triquetrum", "capitate", "hamate",
              "trapezium", "metacarpals", "scapholunate_ligament", "flexor_tendons", "extensor_tendons",
              "median_nerve", "fluid", "fat", "muscle"),
}

STUDY_FIELDS = ("meta", "labels", "ehr") + PLANES + tuple(f"{p}.seg" for p in PLANES)
RECON_FIELDS = ("meta", "kspace", "target", "mask")   # what a reconstruction slice may hold
JSON_FIELDS = ("meta", "labels", "ehr")


class SchemaError(UserError, ValueError):
    """A sample or manifest that does not follow the schema."""


def field_extension(field: str) -> str:
    return "json" if field in JSON_FIELDS else "npy"


def member_suffix(field: str) -> str:
    """The tar member suffix after ``<key>.`` for a field, e.g. ``sag.seg`` -> ``sag.seg.npy``."""
    return f"{field}.{field_extension(field)}"


def check_key(key: str) -> str:
    if not key or "." in key or "/" in key:
        raise SchemaError(f"invalid sample key '{key}': must be non-empty, without '.' or '/'")
    return key


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def encode_sample(sample: dict[str, Any]) -> dict[str, bytes]:
    """Turn a decoded sample into ``{member_suffix: bytes}`` plus ``__key__`` for a tar writer."""
    key = check_key(sample["__key__"])
    out: dict[str, Any] = {"__key__": key}
    for field, value in sample.items():
        if field == "__key__" or value is None:
            continue
        if field in JSON_FIELDS:
            out[member_suffix(field)] = json.dumps(value, sort_keys=True).encode()
        elif isinstance(value, np.ndarray):
            out[member_suffix(field)] = _npy_bytes(value)
        else:
            raise SchemaError(f"sample {key}: field '{field}' must be a dict (json) or ndarray")
    return out


def decode_member(suffix: str, data: bytes) -> Any:
    """Decode one tar member by its suffix (``sag.npy``, ``meta.json``, ...)."""
    if suffix.endswith(".json"):
        return json.loads(data)
    if suffix.endswith(".npy"):
        return np.load(io.BytesIO(data), allow_pickle=False)
    raise SchemaError(f"unknown member type '{suffix}'")


def field_of(suffix: str) -> str:
    """``sag.seg.npy`` -> ``sag.seg``; ``meta.json`` -> ``meta``."""
    return suffix.rsplit(".", 1)[0]


def validate_study(sample: dict[str, Any]) -> None:
    """Check a decoded study sample against schema v1 (shapes, dtypes, label names)."""
    key = sample.get("__key__", "?")
    meta = sample.get("meta")
    if not isinstance(meta, dict):
        raise SchemaError(f"sample {key}: missing meta")
    joint = meta.get("joint")
    if joint not in LABELS:
        raise SchemaError(f"sample {key}: unknown joint '{joint}'; known: {', '.join(JOINTS)}")
    planes = [p for p in PLANES if p in sample]
    if not planes:
        raise SchemaError(f"sample {key}: no plane among {PLANES}")
    for p in planes:
        vol = sample[p]
        if vol.ndim != 3:
            raise SchemaError(f"sample {key}: plane {p} must be (slices, rows, cols), got {vol.shape}")
        if not np.isfinite(vol).all():
            raise SchemaError(f"sample {key}: plane {p} contains NaN or infinite values")
        seg = sample.get(f"{p}.seg")
        if seg is not None and seg.shape != vol.shape:
            raise SchemaError(f"sample {key}: {p}.seg shape {seg.shape} != image {vol.shape}")
        if p not in meta.get("planes", {}):
            raise SchemaError(f"sample {key}: meta.planes lacks '{p}'")
    labels = sample.get("labels")
    if labels is not None:
        unknown = set(labels) - set(LABELS[joint])
        if unknown:
            raise SchemaError(f"sample {key}: unknown labels {sorted(unknown)} for {joint}")
