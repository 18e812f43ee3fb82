"""Procedural, joint-specific anatomy: structures as geometric primitives in millimetres.

Each builder takes a patient's random generator and returns the structures in painter's order
(later ones overwrite earlier ones in the label map) plus the named parts findings attach to.
Sizes and positions vary per patient (global scale, small offsets), so no two knees are alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .geometry import Capsule, Ellipsoid, Ring, Shell
from .vocab import STRUCTURES

A = np.array

# Tissue class of every structure (drives the intensity under each contrast).
TISSUE = {
    "background": "air", "femur": "marrow", "tibia": "marrow", "patella": "marrow", "fibula": "marrow",
    "talus": "marrow", "calcaneus": "marrow", "humerus": "marrow", "glenoid": "marrow",
    "acromion": "marrow", "clavicle": "marrow",
    "femoral_cartilage": "cartilage", "tibial_cartilage": "cartilage", "talar_cartilage": "cartilage",
    "humeral_cartilage": "cartilage",
    "medial_meniscus": "fibrous", "lateral_meniscus": "fibrous", "labrum": "fibrous",
    "acl": "fibrous", "pcl": "fibrous", "mcl": "fibrous", "lcl": "fibrous", "atfl": "fibrous",
    "cfl": "fibrous", "achilles": "fibrous", "supraspinatus": "fibrous", "infraspinatus": "fibrous",
    "subscapularis": "fibrous", "biceps_tendon": "fibrous",
    "fluid": "fluid", "bursa": "fluid", "fat": "fat", "muscle": "muscle",
    # hip, elbow, wrist (regions.py); nerves image like cartilage
    **{n: "marrow" for n in ("femoral_head", "acetabulum", "ilium", "ischium", "pubis", "greater_trochanter",
                             "capitellum", "trochlea", "radius", "ulna", "scaphoid", "lunate", "triquetrum",
                             "capitate", "hamate", "trapezium", "metacarpals")},
    **{n: "cartilage" for n in ("femoral_head_cartilage", "acetabular_cartilage", "sciatic_nerve", "ulnar_nerve",
                                "median_nerve")},
    **{n: "fibrous" for n in ("ligamentum_teres", "ucl", "radial_collateral", "annular_ligament", "triceps_tendon",
                              "common_extensor", "common_flexor", "tfcc", "scapholunate_ligament", "flexor_tendons",
                              "extensor_tendons")},
    "iliopsoas": "muscle", "gluteus_medius": "muscle",
}

# Relative signal of each tissue per contrast (fat-suppressed sequences darken fat and marrow).
CONTRASTS = {
    "PD":    {"air": 0.0, "marrow": 0.72, "cartilage": 0.55, "fibrous": 0.07, "fluid": 0.62, "fat": 0.85, "muscle": 0.38},
    "PD_FS": {"air": 0.0, "marrow": 0.18, "cartilage": 0.52, "fibrous": 0.06, "fluid": 0.95, "fat": 0.10, "muscle": 0.33},
    "T1":    {"air": 0.0, "marrow": 0.88, "cartilage": 0.42, "fibrous": 0.05, "fluid": 0.20, "fat": 0.95, "muscle": 0.34},
    "T2_FS": {"air": 0.0, "marrow": 0.12, "cartilage": 0.30, "fibrous": 0.04, "fluid": 1.00, "fat": 0.08, "muscle": 0.24},
}


@dataclass
class Anatomy:
    joint: str
    parts: list[tuple[str, object]]                     # (structure, primitive) in paint order
    landmarks: dict[str, object] = field(default_factory=dict)

    def structure_index(self, name: str) -> int:
        return STRUCTURES[self.joint].index(name)


def _jit(rng: np.random.Generator, s: float, p, spread: float = 1.5) -> np.ndarray:
    return (A(p, dtype=np.float32) * s + rng.normal(0, spread, 3)).astype(np.float32)


def _limb(rng, s, radius, z0, z1):
    """Subcutaneous fat sleeve with muscle inside it, along z."""
    return [("fat", Capsule(A([0, 0, z0], np.float32), A([0, 0, z1], np.float32), radius * s)),
            ("muscle", Capsule(A([0, 0, z0], np.float32), A([0, 0, z1], np.float32), (radius - 5) * s))]


def knee(rng: np.random.Generator) -> Anatomy:
    s = float(rng.uniform(0.88, 1.12))
    j = lambda p, spread=1.0: _jit(rng, s, p, spread)  # noqa: E731
    femur_m, femur_l = Ellipsoid(j([-19, -2, 20]), A([17, 24, 19]) * s), Ellipsoid(j([19, -2, 20]), A([17, 24, 19]) * s)
    tibia = Ellipsoid(j([0, 0, -20]), A([40, 29, 17]) * s)
    acl = Capsule(j([-3, 9, -4]), j([9, -11, 15]), 3.2 * s)
    pcl = Capsule(j([0, -17, -5]), j([-8, 4, 15]), 3.8 * s)
    mcl = Capsule(j([-41, -1, 26]), j([-39, 2, -30]), 2.4 * s)
    lcl = Capsule(j([41, -4, 24]), j([33, -10, -30]), 2.4 * s)
    mm = Ring(j([-19, -1, -1]), 14 * s, 3.6 * s, "z")
    lm = Ring(j([19, -1, -1]), 12 * s, 3.6 * s, "z")
    recess = Ellipsoid(j([0, 27, 42]), A([24, 3.0, 12]) * s)
    parts = _limb(rng, s, 58, -70, 70) + [
        ("fat", Ellipsoid(j([0, 26, -4]), A([17, 9, 10]) * s)),
        ("fluid", Ellipsoid(j([0, 2, 1]), A([42, 30, 6]) * s)),
        ("fluid", recess),
        ("femur", Capsule(j([0, 2, 25]), j([0, 4, 75]), 17 * s)),
        ("femur", femur_m), ("femur", femur_l),
        ("tibia", tibia), ("tibia", Capsule(j([0, 0, -25]), j([0, 0, -75]), 16 * s)),
        ("fibula", Capsule(j([31, -12, -26]), j([33, -14, -75]), 6 * s)),
        ("patella", Ellipsoid(j([0, 36, 24]), A([19, 6.5, 17]) * s)),
        ("femoral_cartilage", Shell(femur_m, 2.4 * s, "z", -1)),
        ("femoral_cartilage", Shell(femur_l, 2.4 * s, "z", -1)),
        ("tibial_cartilage", Shell(tibia, 2.2 * s, "z", +1)),
        ("medial_meniscus", mm), ("lateral_meniscus", lm),
        ("acl", acl), ("pcl", pcl), ("mcl", mcl), ("lcl", lcl),
    ]
    marks = {"acl": acl, "pcl": pcl, "mcl": mcl, "lcl": lcl, "medial_meniscus": mm,
             "lateral_meniscus": lm, "femur_m": femur_m, "femur_l": femur_l, "tibia": tibia,
             "recess": recess}
    return Anatomy("knee", parts, marks)


def ankle(rng: np.random.Generator) -> Anatomy:
    s = float(rng.uniform(0.88, 1.12))
    j = lambda p, spread=1.0: _jit(rng, s, p, spread)  # noqa: E731
    talus = Ellipsoid(j([0, 6, 0]), A([18, 24, 12]) * s)
    atfl = Capsule(j([21, 3, -1]), j([11, 19, -3]), 2.4 * s)
    cfl = Capsule(j([22, -6, -6]), j([16, -20, -22]), 2.4 * s)
    achilles = Capsule(j([0, -40, 55]), j([0, -35, -18]), 5 * s)
    parts = _limb(rng, s, 52, -60, 70) + [
        ("fat", Ellipsoid(j([0, -27, 12]), A([10, 7, 20]) * s)),
        ("fluid", Ellipsoid(j([0, 5, 8]), A([22, 26, 8]) * s)),
        ("tibia", Capsule(j([0, 0, 22]), j([0, 0, 70]), 14 * s)),
        ("tibia", Ellipsoid(j([0, 0, 18]), A([20, 18, 7]) * s)),
        ("fibula", Capsule(j([22, -5, 8]), j([24, -8, 70]), 6 * s)),
        ("fibula", Ellipsoid(j([22, -4, 2]), A([6, 8, 11]) * s)),
        ("talus", talus),
        ("calcaneus", Ellipsoid(j([0, -19, -24]), A([16, 32, 13]) * s)),
        ("talar_cartilage", Shell(talus, 2.0 * s, "z", +1)),
        ("atfl", atfl), ("cfl", cfl), ("achilles", achilles),
    ]
    return Anatomy("ankle", parts, {"atfl": atfl, "cfl": cfl, "achilles": achilles, "talus": talus})


def shoulder(rng: np.random.Generator) -> Anatomy:
    s = float(rng.uniform(0.88, 1.12))
    j = lambda p, spread=1.0: _jit(rng, s, p, spread)  # noqa: E731
    head = Ellipsoid(j([10, 0, 0]), A([22, 22, 22]) * s)
    glenoid = Ellipsoid(j([-17, 0, 0]), A([6, 14, 18]) * s)
    ssp = Capsule(j([-40, -4, 24]), j([22, 0, 20]), 5 * s)
    isp = Capsule(j([-40, -26, 4]), j([18, -18, 8]), 6 * s)
    subsc = Capsule(j([-40, 16, -2]), j([6, 19, -6]), 6 * s)
    biceps = Capsule(j([20, 17, 16]), j([22, 19, -45]), 2.6 * s)
    bursa = Ellipsoid(j([10, -2, 28]), A([20, 10, 1.4]) * s)
    ac = Ellipsoid(j([-8, 8, 32]), A([4, 6, 5]) * s)
    labrum = Ring(j([-12, 0, 0]), 14 * s, 3 * s, "x")
    parts = [("fat", Ellipsoid(j([0, 0, -5]), A([60, 52, 62]) * s)),
             ("muscle", Ellipsoid(j([0, 0, -5]), A([54, 46, 56]) * s)),
             ("fluid", Ellipsoid(j([-2, 0, 0]), A([20, 24, 26]) * s)),
             ("humerus", head), ("humerus", Capsule(j([14, 0, -10]), j([16, 0, -70]), 12 * s)),
             ("glenoid", glenoid), ("glenoid", Capsule(j([-25, -10, 0]), j([-55, -32, -40]), 5 * s)),
             ("acromion", Ellipsoid(j([8, -6, 32]), A([22, 12, 4]) * s)),
             ("clavicle", Capsule(j([-12, 14, 33]), j([-58, 20, 42]), 7 * s)),
             ("humeral_cartilage", Shell(head, 2.0 * s, "x", -1)),
             ("labrum", labrum), ("bursa", bursa),
             ("supraspinatus", ssp), ("infraspinatus", isp), ("subscapularis", subsc),
             ("biceps_tendon", biceps)]
    marks = {"supraspinatus": ssp, "infraspinatus": isp, "subscapularis": subsc, "biceps": biceps,
             "bursa": bursa, "ac": ac, "head": head, "labrum": labrum}
    return Anatomy("shoulder", parts, marks)


BUILDERS = {"knee": knee, "ankle": ankle, "shoulder": shoulder}
