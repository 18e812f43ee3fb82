"""The synthetic generator's vocabulary: its joints, diagnosis labels, label-map structures and EHR
fields. These are the generator's data, not the platform's: every other layer reads the vocabulary of
a shard set from its manifest (:func:`shards.dataset.dataset_of`); :func:`synth_declaration` is what
the generator writes there (and what v1 manifests, which carry none, read as).
"""

from __future__ import annotations

from ..dataset import AnatomySpec, DatasetDeclaration, EHRField, LabelSpec

JOINTS = ("knee", "ankle", "shoulder")   # the default build; hip, elbow, wrist are opt-in (synth.joints)

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
    # more regions (label maps only, no diagnosis labels; opt-in, not in JOINTS: shards/synth/regions.py)
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

PATIENT_TYPES = ("outpatient", "emergency", "inpatient")
EVENTS = ("none", "sport", "twisting", "fall", "traffic", "overuse")

EHR = {"age": EHRField("numeric", "years", [0.0, 120.0]),
       "height_cm": EHRField("numeric", "cm", [30.0, 250.0]),
       "weight_kg": EHRField("numeric", "kg", [1.0, 400.0]),
       "sex": EHRField("categorical", values=["F", "M"]),
       "patient_type": EHRField("categorical", values=list(PATIENT_TYPES)),
       "injury_event": EHRField("categorical", values=list(EVENTS))}


def synth_declaration(joints=JOINTS) -> DatasetDeclaration:
    """The declaration of synthetic shards (all joints, or those a build generates)."""
    anatomies = {j: AnatomySpec({name: LabelSpec() for name in LABELS[j]},
                                {name: i for i, name in enumerate(STRUCTURES[j]) if i})
                 for j in joints}
    return DatasetDeclaration("synth", "mskfm's synthetic multi-joint MSK studies", anatomies,
                              {k: EHRField(**vars(v)) for k, v in EHR.items()})
