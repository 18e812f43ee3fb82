"""Patients: an EHR record, then labels drawn from a logistic risk model on it.

EHR fields (age, sex, BMI, injury event, patient type) shift the odds of each label and some labels
raise the odds of others (an ACL tear comes with effusion and lateral meniscal tears), so the EHR
is informative without giving the labels away. Intercepts are calibrated once by Monte Carlo so
the marginal prevalence of every label matches ``PREVALENCE``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .vocab import EVENTS, LABELS, PATIENT_TYPES

PREVALENCE = {
    "knee": {"acl": 0.22, "pcl": 0.06, "medial_meniscus": 0.35, "lateral_meniscus": 0.22,
             "mcl": 0.12, "lcl": 0.07, "cartilage_bml": 0.40, "effusion": 0.35},
    "ankle": {"atfl": 0.35, "cfl": 0.15, "achilles": 0.12, "osteochondral": 0.15},
    "shoulder": {"supraspinatus": 0.45, "infraspinatus": 0.12, "subscapularis": 0.15,
                 "biceps_long_head": 0.18, "ac_joint": 0.40, "glenohumeral": 0.22,
                 "biceps_effusion": 0.25, "subacromial_bursa": 0.35},
}

# Log-odds effects: EHR features (age_z, bmi_z, male, sport, trauma, overuse) and earlier labels.
RISK = {
    "acl": {"sport": 1.3, "age_z": -0.5},
    "pcl": {"trauma": 1.3},
    "medial_meniscus": {"age_z": 0.6, "acl": 0.6, "sport": 0.3},
    "lateral_meniscus": {"acl": 1.1},
    "mcl": {"sport": 0.6, "trauma": 0.5},
    "lcl": {"trauma": 0.8, "acl": 0.5},
    "cartilage_bml": {"age_z": 0.9, "bmi_z": 0.5, "acl": 0.5},
    "effusion": {"acl": 1.2, "cartilage_bml": 0.6, "medial_meniscus": 0.4},
    "atfl": {"sport": 1.0, "age_z": -0.3},
    "cfl": {"atfl": 1.6},
    "achilles": {"age_z": 0.4, "sport": 0.6, "male": 0.5},
    "osteochondral": {"atfl": 0.8, "trauma": 0.4},
    "supraspinatus": {"age_z": 1.0, "overuse": 0.5},
    "infraspinatus": {"supraspinatus": 1.2},
    "subscapularis": {"supraspinatus": 0.8, "trauma": 0.6},
    "biceps_long_head": {"subscapularis": 1.0, "overuse": 0.4},
    "ac_joint": {"age_z": 0.6, "male": 0.4},
    "glenohumeral": {"age_z": 0.8},
    "biceps_effusion": {"biceps_long_head": 1.2, "glenohumeral": 0.6},
    "subacromial_bursa": {"supraspinatus": 1.0, "overuse": 0.3},
}

AGE = {"knee": (40.0, 15.0), "ankle": (38.0, 15.0), "shoulder": (52.0, 14.0),
       "hip": (55.0, 15.0), "elbow": (42.0, 14.0), "wrist": (38.0, 15.0)}


def draw_ehr(rng: np.random.Generator, joint: str) -> dict:
    mu, sd = AGE[joint]
    age = float(np.clip(rng.normal(mu, sd), 14, 90))
    male = bool(rng.random() < 0.5)
    height = float(rng.normal(178 if male else 165, 7))
    bmi = float(np.clip(rng.normal(26, 4), 17, 45))
    young = 1.0 / (1.0 + np.exp((age - 40) / 8))
    w = np.array([0.25 + 0.3 * (1 - young), 0.35 * young, 0.25 * young, 0.12 + 0.15 * (1 - young),
                  0.06, 0.1 + 0.2 * (1 - young)])
    event = EVENTS[int(rng.choice(len(EVENTS), p=w / w.sum()))]
    pt = np.array([0.75, 0.15, 0.10]) + (np.array([-0.35, 0.3, 0.05]) if event in ("fall", "traffic") else 0)
    return {"age": round(age, 1), "sex": "M" if male else "F", "height_cm": round(height, 1),
            "weight_kg": round(bmi * (height / 100) ** 2, 1),
            "patient_type": PATIENT_TYPES[int(rng.choice(3, p=pt / pt.sum()))], "injury_event": event}


def ehr_features(ehr: dict, joint: str) -> dict[str, float]:
    mu, sd = AGE[joint]
    bmi = ehr["weight_kg"] / (ehr["height_cm"] / 100) ** 2
    ev = ehr["injury_event"]
    return {"age_z": (ehr["age"] - mu) / sd, "bmi_z": (bmi - 26.0) / 4.0,
            "male": float(ehr["sex"] == "M"), "sport": float(ev in ("sport", "twisting")),
            "trauma": float(ev in ("fall", "traffic")), "overuse": float(ev == "overuse")}


def _logit_terms(label: str, feats: dict, labels: dict) -> float:
    return sum(coef * float(feats.get(k, labels.get(k) or 0)) for k, coef in RISK.get(label, {}).items())


@lru_cache(maxsize=None)
def intercepts(joint: str, n: int = 4000) -> dict[str, float]:
    """Per-label intercepts so marginal prevalence matches PREVALENCE (Monte Carlo + bisection)."""
    rng = np.random.default_rng(12345)
    feats = [ehr_features(draw_ehr(rng, joint), joint) for _ in range(n)]
    drawn: list[dict] = [{} for _ in range(n)]
    out = {}
    u = rng.random((n, len(LABELS[joint])))
    for li, label in enumerate(LABELS[joint]):
        terms = np.array([_logit_terms(label, f, d) for f, d in zip(feats, drawn)])
        lo, hi = -10.0, 10.0
        for _ in range(50):
            mid = (lo + hi) / 2
            if (1 / (1 + np.exp(-(mid + terms)))).mean() < PREVALENCE[joint][label]:
                lo = mid
            else:
                hi = mid
        out[label] = (lo + hi) / 2
        probs = 1 / (1 + np.exp(-(out[label] + terms)))
        for d, p, r in zip(drawn, probs, u[:, li]):
            d[label] = int(r < p)
    return out


def draw_labels(rng: np.random.Generator, joint: str, ehr: dict,
                missing_rate: float) -> tuple[dict, dict]:
    """(truth, observed): labels (0/1) from the risk model, and the same with some set to None
    (unknown to the annotator) at ``missing_rate``. Draws a fixed number of random values."""
    feats = ehr_features(ehr, joint)
    icpt = intercepts(joint)
    u = rng.random(len(LABELS[joint]))
    miss = rng.random(len(LABELS[joint])) < missing_rate
    labels: dict = {}
    for i, label in enumerate(LABELS[joint]):
        p = 1 / (1 + np.exp(-(icpt[label] + _logit_terms(label, feats, labels))))
        labels[label] = int(u[i] < p)
    return labels, {k: (None if m else v) for (k, v), m in zip(labels.items(), miss)}
