"""Abnormalities as image findings, each tied to a label.

A finding is a soft region (Gaussian blob) placed on the relevant anatomy that pulls the image
toward fluid signal (tear, edema, effusion, bursitis). Its conspicuity in a plane is
``severity × VISIBILITY[label][plane]``: radiologists read an ACL tear on sagittal images, an MCL
tear on coronal ones, an ATFL tear on axial ones, and the same lesion is faint elsewhere — so
plane fusion matters. Thin slices across a thin cleft also wash it out (partial volume).

Every parameter is drawn for every label whether or not it is positive, in a fixed order, so
forcing one label on or off changes nothing else in the study.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .anatomy import Anatomy
from .geometry import Blob, Capsule, Ring

VISIBILITY: dict[str, dict[str, float]] = {
    # knee
    "acl": {"sag": 1.0, "cor": 0.45, "ax": 0.2},
    "pcl": {"sag": 1.0, "cor": 0.4, "ax": 0.2},
    "medial_meniscus": {"sag": 1.0, "cor": 0.7, "ax": 0.15},
    "lateral_meniscus": {"sag": 1.0, "cor": 0.7, "ax": 0.15},
    "mcl": {"sag": 0.15, "cor": 1.0, "ax": 0.6},
    "lcl": {"sag": 0.15, "cor": 1.0, "ax": 0.5},
    "cartilage_bml": {"sag": 0.9, "cor": 0.8, "ax": 0.3},
    "effusion": {"sag": 1.0, "cor": 0.35, "ax": 0.9},
    # ankle
    "atfl": {"sag": 0.2, "cor": 0.45, "ax": 1.0},
    "cfl": {"sag": 0.3, "cor": 1.0, "ax": 0.55},
    "achilles": {"sag": 1.0, "cor": 0.2, "ax": 0.8},
    "osteochondral": {"sag": 0.8, "cor": 1.0, "ax": 0.25},
    # shoulder
    "supraspinatus": {"sag": 0.8, "cor": 1.0, "ax": 0.25},
    "infraspinatus": {"sag": 1.0, "cor": 0.4, "ax": 0.8},
    "subscapularis": {"sag": 0.8, "cor": 0.3, "ax": 1.0},
    "biceps_long_head": {"sag": 0.5, "cor": 0.4, "ax": 1.0},
    "ac_joint": {"sag": 0.6, "cor": 1.0, "ax": 0.45},
    "glenohumeral": {"sag": 0.5, "cor": 0.7, "ax": 1.0},
    "biceps_effusion": {"sag": 0.5, "cor": 0.3, "ax": 1.0},
    "subacromial_bursa": {"sag": 0.8, "cor": 1.0, "ax": 0.3},
}


@dataclass
class FindingParams:
    severity: float      # 0.35..1: partial tears are faint
    t: float             # position along the structure
    angle: float         # position around rings
    size: float          # mm scale of the lesion
    jitter: np.ndarray   # mm offset of the lesion centre


def draw_params(rng: np.random.Generator) -> FindingParams:
    return FindingParams(severity=float(rng.uniform(0.35, 1.0)), t=float(rng.uniform(0.3, 0.7)),
                         angle=float(rng.uniform(0, 2 * np.pi)), size=float(rng.uniform(0.8, 1.3)),
                         jitter=rng.normal(0, 1.5, 3).astype(np.float32))


def _on_capsule(c: Capsule, p: FindingParams, scale: float = 1.6) -> Blob:
    r = c.radius * scale * p.size
    return Blob(c.point(p.t) + p.jitter * 0.3, np.array([r, r, r], np.float32))


def _on_ring(ring: Ring, p: FindingParams) -> Blob:
    """A thin horizontal cleft in the posterior horn of a meniscus."""
    ang = np.pi * 1.5 + (p.t - 0.5) * 1.5  # posterior (−y) side
    c = ring.center + np.array([np.cos(ang) * ring.major, np.sin(ang) * ring.major, 0], np.float32)
    return Blob(c, np.array([3.5 * p.size, 3.5 * p.size, 0.9], np.float32))


def _subchondral(ell, p: FindingParams, side: int) -> Blob:
    """Marrow edema just inside the articular surface of an ellipsoidal bone end."""
    c = ell.center + np.array([p.jitter[0] * 2, p.jitter[1] * 3, side * ell.radii[2] * 0.75], np.float32)
    s = 5.5 * p.size
    return Blob(c, np.array([s, s, s * 0.8], np.float32))


def _at(center, sigma, p: FindingParams) -> Blob:
    return Blob(np.asarray(center, np.float32) + p.jitter * 0.5, np.asarray(sigma, np.float32) * p.size)


# Structures a finding may change: a tear brightens the ligament itself, marrow edema the bone.
HOSTS: dict[str, tuple[str, ...]] = {
    "biceps_long_head": ("biceps_tendon",),
    "cartilage_bml": ("femur", "femoral_cartilage", "tibia", "tibial_cartilage"),
    "osteochondral": ("talus", "talar_cartilage"),
    "effusion": ("fluid", "fat", "muscle"),
    "subacromial_bursa": ("bursa", "fat", "muscle"),
    "biceps_effusion": ("fluid", "fat", "muscle"),
    "ac_joint": ("acromion", "clavicle", "fat", "muscle"),
    "glenohumeral": ("humerus", "humeral_cartilage", "glenoid", "labrum", "fluid"),
}


def hosts(label: str) -> tuple[str, ...]:
    return HOSTS.get(label, (label,))


def lesion(label: str, anatomy: Anatomy, p: FindingParams) -> Blob:
    """Where the finding of ``label`` sits for this patient."""
    m = anatomy.landmarks
    if label in ("acl", "pcl", "mcl", "lcl", "atfl", "cfl", "achilles",
                 "supraspinatus", "infraspinatus", "subscapularis"):
        return _on_capsule(m[label], p)
    if label == "biceps_long_head":
        return _on_capsule(m["biceps"], p, 2.0)
    if label in ("medial_meniscus", "lateral_meniscus"):
        return _on_ring(m[label], p)
    if label == "cartilage_bml":
        return _subchondral(m["femur_m"] if p.angle < np.pi else m["femur_l"], p, -1)
    if label == "osteochondral":
        return _subchondral(m["talus"], p, +1)
    if label == "effusion":
        r = m["recess"]
        return _at(r.center + np.array([0, 2, 0], np.float32), r.radii * np.array([0.9, 2.8, 1.1]), p)
    if label == "subacromial_bursa":
        b = m["bursa"]
        return _at(b.center, [16, 9, 3.5], p)
    if label == "biceps_effusion":
        b = m["biceps"]
        return _at(b.point(0.55), [5, 5, 14], p)
    if label == "ac_joint":
        return _at(m["ac"].center, [5, 6, 5], p)
    if label == "glenohumeral":
        h = m["head"]
        return _at(h.center - np.array([h.radii[0] * 0.8, 0, 0], np.float32), [5, 9, 9], p)
    raise KeyError(f"no finding model for label '{label}'")


def mimic(anatomy: Anatomy, rng: np.random.Generator) -> tuple[Blob, tuple[str, ...], float]:
    """A faint normal-variant signal on a random tendon/ligament (magic angle, vessels):
    present in healthy and diseased studies alike, so findings are not trivially separable."""
    names = [k for k, v in anatomy.landmarks.items() if isinstance(v, Capsule)]
    name = names[int(rng.integers(len(names)))]
    p = draw_params(rng)
    host = "biceps_tendon" if name == "biceps" else name
    return _on_capsule(anatomy.landmarks[name], p, 1.2), (host,), float(rng.uniform(0.1, 0.35))
