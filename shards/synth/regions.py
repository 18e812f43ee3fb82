"""More MSK regions for the generator: hip, elbow and wrist/hand (with knee, ankle and shoulder: six
regions, 67 distinct structures), as in MRAnnotator's many-structure model.

Their structures are declared with the other joints' (:data:`.vocab.STRUCTURES`), their tissues in
:data:`.anatomy.TISSUE`, protocols in :data:`.render.PROTOCOLS`. They are opt-in (``synth.joints=[knee,ankle,shoulder,hip,elbow,wrist]``): the default build and its
seeds produce the same data as before. These regions carry label maps (in every plane, from the same
patient-frame anatomy) but no diagnosis labels. Coordinates are millimetres in the patient frame of
:mod:`.geometry` (x lateral, y anterior, z superior).
"""

from __future__ import annotations

import numpy as np

from .anatomy import BUILDERS as JOINT_BUILDERS
from .anatomy import Anatomy, _jit, _limb
from .geometry import Capsule, Ellipsoid, Ring, Shell

A = np.array

def hip(rng: np.random.Generator) -> Anatomy:
    s = float(rng.uniform(0.88, 1.12))
    j = lambda p, spread=1.0: _jit(rng, s, p, spread)  # noqa: E731
    head = Ellipsoid(j([0, 0, 0]), A([20, 20, 20]) * s)
    psoas = Capsule(j([-12, 24, 60]), j([18, 18, -40]), 9 * s)
    glut = Capsule(j([-10, -22, 70]), j([40, -8, -14]), 11 * s)
    nerve = Capsule(j([-18, -34, 40]), j([-12, -36, -60]), 3.5 * s)
    teres = Capsule(head.center, j([-14, 0, -2]), 2.5 * s)
    parts = _limb(rng, s, 66, -80, 80) + [
        ("iliopsoas", psoas), ("gluteus_medius", glut),
        ("fluid", Ellipsoid(head.center, A([27, 27, 27]) * s)),
        ("ilium", Capsule(j([-16, -4, 22]), j([-12, -12, 75]), 15 * s)),
        ("ischium", Capsule(j([-14, -16, -12]), j([-10, -22, -45]), 9 * s)),
        ("pubis", Capsule(j([-18, 16, -6]), j([-50, 22, -14]), 8 * s)),
        ("acetabulum", Ellipsoid(j([-8, 0, 6]), A([25, 27, 25]) * s)),
        ("acetabular_cartilage", Shell(Ellipsoid(head.center, head.radii + 2.2 * s), 2.0 * s, "z", +1)),
        ("femur", Capsule(j([4, 0, -4]), j([28, 0, -28]), 12 * s)),
        ("femur", Capsule(j([28, 0, -28]), j([32, 0, -80]), 13 * s)),
        ("greater_trochanter", Ellipsoid(j([34, -6, -20]), A([10, 13, 13]) * s)),
        ("femoral_head", head), ("femoral_head_cartilage", Shell(head, 2.2 * s, "z", +1)),
        ("labrum", Ring(j([-4, 0, 10]), 21 * s, 3 * s, "x")), ("ligamentum_teres", teres),
        ("sciatic_nerve", nerve),
    ]
    # landmarks = findings and mimics anchors, named as their structures (mimic() paints on them)
    return Anatomy("hip", parts, {"iliopsoas": psoas, "gluteus_medius": glut, "sciatic_nerve": nerve,
                                  "ligamentum_teres": teres})


def elbow(rng: np.random.Generator) -> Anatomy:
    s = float(rng.uniform(0.88, 1.12))
    j = lambda p, spread=1.0: _jit(rng, s, p, spread)  # noqa: E731
    capitellum = Ellipsoid(j([14, 2, 6]), A([9, 9, 9]) * s)
    ucl = Capsule(j([-24, 0, 4]), j([-16, -4, -22]), 2.4 * s)
    rcl = Capsule(j([24, 0, 6]), j([22, -2, -16]), 2.4 * s)
    biceps = Capsule(j([6, 24, 40]), j([14, 8, -22]), 3.5 * s)
    triceps = Capsule(j([-6, -28, 50]), j([-8, -22, 10]), 4 * s)
    extensor = Capsule(j([26, 0, 8]), j([34, 6, -40]), 3 * s)
    flexor = Capsule(j([-26, 4, 6]), j([-30, 10, -40]), 3 * s)
    nerve = Capsule(j([-22, -14, 40]), j([-20, -10, -40]), 2.2 * s)
    parts = _limb(rng, s, 44, -80, 80) + [
        ("fluid", Ellipsoid(j([2, 0, 2]), A([30, 18, 16]) * s)),
        ("humerus", Capsule(j([0, -4, 20]), j([0, -6, 80]), 12 * s)),
        ("trochlea", Ellipsoid(j([-10, 0, 6]), A([12, 10, 10]) * s)), ("capitellum", capitellum),
        ("humeral_cartilage", Shell(capitellum, 1.6 * s, "z", -1)),
        ("radius", Ellipsoid(j([14, 2, -9]), A([9, 9, 5]) * s)),
        ("radius", Capsule(j([14, 2, -10]), j([18, 6, -75]), 7 * s)),
        ("ulna", Ellipsoid(j([-8, -14, 2]), A([10, 9, 14]) * s)),
        ("ulna", Capsule(j([-8, -6, -8]), j([-4, -4, -80]), 7 * s)),
        ("annular_ligament", Ring(j([14, 2, -12]), 10 * s, 2 * s, "z")),
        ("ucl", ucl), ("radial_collateral", rcl), ("biceps_tendon", biceps), ("triceps_tendon", triceps),
        ("common_extensor", extensor), ("common_flexor", flexor), ("ulnar_nerve", nerve),
    ]
    return Anatomy("elbow", parts, {"ucl": ucl, "radial_collateral": rcl, "biceps": biceps, "triceps_tendon": triceps,
                                    "common_extensor": extensor, "common_flexor": flexor})


def wrist(rng: np.random.Generator) -> Anatomy:
    s = float(rng.uniform(0.88, 1.12))
    j = lambda p, spread=1.0: _jit(rng, s, p, spread)  # noqa: E731
    flexors = Capsule(j([0, 12, 40]), j([0, 12, -60]), 5 * s)
    extensors = Capsule(j([0, -12, 40]), j([0, -12, -60]), 3 * s)
    nerve = Capsule(j([4, 17, 40]), j([4, 17, -40]), 2.5 * s)
    sl = Capsule(j([6, 0, 6]), j([6, 0, -1]), 1.8 * s)
    parts = _limb(rng, s, 36, -80, 80) + [
        ("fluid", Ellipsoid(j([0, 0, 0]), A([24, 12, 18]) * s)),
        ("radius", Capsule(j([10, 0, 20]), j([8, 0, 70]), 11 * s)),
        ("radius", Ellipsoid(j([10, 0, 14]), A([16, 10, 6]) * s)),
        ("ulna", Capsule(j([-16, 0, 18]), j([-14, 0, 70]), 7 * s)),
        ("tfcc", Ellipsoid(j([-14, 0, 10]), A([7, 7, 2]) * s)),
        ("scaphoid", Ellipsoid(j([12, 2, 2]), A([6, 6, 9]) * s, (0.0, 30.0, 0.0))),
        ("lunate", Ellipsoid(j([0, 0, 3]), A([6, 7, 5]) * s)),
        ("triquetrum", Ellipsoid(j([-11, -1, 1]), A([5, 5, 5]) * s)),
        ("capitate", Ellipsoid(j([2, 0, -12]), A([6, 7, 9]) * s)),
        ("hamate", Ellipsoid(j([-10, 0, -12]), A([6, 7, 8]) * s)),
        ("trapezium", Ellipsoid(j([16, 4, -10]), A([5, 6, 6]) * s)),
        *[("metacarpals", Capsule(j([x, 0, -24]), j([x * 1.3, 0, -75]), 4.5 * s)) for x in (16, 6, -4, -14)],
        ("scapholunate_ligament", sl), ("flexor_tendons", flexors), ("extensor_tendons", extensors),
        ("median_nerve", nerve),
    ]
    return Anatomy("wrist", parts, {"flexor_tendons": flexors, "extensor_tendons": extensors,
                                    "scapholunate_ligament": sl})


BUILDERS = {**JOINT_BUILDERS, "hip": hip, "elbow": elbow, "wrist": wrist}
