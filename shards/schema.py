"""Sample schema (v1 and v2): what one study (or one reconstruction slice) looks like in a shard.

A decoded *study* sample is a dict::

    {"__key__": "s-3f2a...",            # de-identified study id (no dots: WebDataset splits on them)
     "meta": {...},                      # joint (the anatomy), site, field strength, vendor, split, planes{...}
     "sag": float32 (slices, rows, cols), "cor": ..., "ax": ...,   # any plane may be absent
     "sag.seg": uint8 label map on the sag grid (optional), ...
     "labels": {"acl": 1, "cartilage_grade": 2, "effusion": None, ...},  # None = unknown
     "ehr": {...}}                       # optional structured record

A decoded *reconstruction* sample (one slice) is ``{"__key__", "meta", "kspace": complex64
(coils, rows, cols), "target": float32 (rows, cols), "seg": uint8 label map (rows, cols), optional}``
(``meta.structures`` names its values, as for a study). On disk each field is one tar member named
``<key>.<field>.<ext>`` (``.npy`` for arrays, ``.json`` for dicts). Which anatomies, labels (and
their types), structures and EHR fields are valid is the dataset's declaration (:mod:`shards.dataset`).
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np

from .config import UserError
from .dataset import PLANES, DatasetDeclaration, check_sample

# v2: the manifest carries the dataset declaration (``dataset``, :mod:`shards.dataset`); v1 manifests
# have none and read as the synthetic generator's vocabulary. Samples are the same in both.
SCHEMA_VERSION = 2
KNOWN_SCHEMA_VERSIONS = (1, 2)

PLANE_NAMES = {"sag": "sagittal", "cor": "coronal", "ax": "axial"}
STUDY_FIELDS = ("meta", "labels", "ehr") + PLANES + tuple(f"{p}.seg" for p in PLANES)
RECON_FIELDS = ("meta", "kspace", "target", "mask", "seg")   # what a reconstruction slice may hold
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


def decode_member(suffix: str, data) -> Any:
    """Decode one tar member (bytes or a writable buffer) by its suffix (``sag.npy``, ``meta.json``, ...)."""
    if suffix.endswith(".json"):
        return json.loads(bytes(data))
    if suffix.endswith(".npy"):
        return decode_npy(data)
    raise SchemaError(f"unknown member type '{suffix}'")


NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def decode_npy(data) -> np.ndarray:
    """A ``.npy`` member as an array: a view of ``data`` when it is writable (no copy), else a copy.
    The header is parsed by numpy (its size limit included); object arrays are refused (they would be
    unpickled), as is data whose size differs from the header's shape and dtype."""
    view = memoryview(data)
    head = io.BytesIO(view[:16384])  # numpy refuses headers over 10,000 bytes
    version = np.lib.format.read_magic(head)
    if version not in NPY_HEADERS:
        raise SchemaError(f".npy format version {version} is not supported (1.0 or 2.0)")
    shape, fortran, dtype = NPY_HEADERS[version](head)
    if dtype.hasobject:
        raise SchemaError(f".npy holds an object array ({dtype}): refused, reading it would unpickle")
    size = view.nbytes - head.tell()
    if size != dtype.itemsize * math.prod(shape):
        raise SchemaError(f".npy holds {size} data bytes, its header declares {dtype} {shape}")
    arr = np.ndarray(shape, dtype, buffer=data, offset=head.tell(), order="F" if fortran else "C")
    return arr if arr.flags.writeable else arr.copy()


def field_of(suffix: str) -> str:
    """``sag.seg.npy`` -> ``sag.seg``; ``meta.json`` -> ``meta``."""
    return suffix.rsplit(".", 1)[0]


def validate_study(sample: dict[str, Any], dataset: DatasetDeclaration) -> None:
    """Check a decoded study sample: shapes, dtypes, and anatomy, labels, EHR values and label-map
    values against the dataset's declaration."""
    key = sample.get("__key__", "?")
    meta = sample.get("meta")
    if not isinstance(meta, dict):
        raise SchemaError(f"sample {key}: missing meta")
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
    problems = check_sample(dataset, sample)
    if problems:
        raise SchemaError(f"sample {key}: " + "; ".join(problems))
