"""One synthetic patient's exam: config schema, the study generator, and its k-space slices.

Deterministic: patient ``p`` draws from ``default_rng([seed, p])`` and its visit ``v`` from
``default_rng([seed, p, v + 1])``, so any study can be regenerated alone (resumable builds) and
forcing a label changes nothing else in the study.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from ..config import ConfigError
from ..schema import PLANES
from .findings import VISIBILITY, draw_params, hosts, lesion, mimic
from .geometry import PlaneGrid
from .kspace import simulate_kspace
from .population import draw_ehr, draw_labels
from .regions import BUILDERS
from .render import SITES, Scanner, protocol_contrast, render_plane
from .vocab import JOINTS, LABELS, STRUCTURES


@dataclass
class KspaceConfig:
    enabled: bool = False
    slices_per_study: int = 2
    coils: dict[str, int] = field(default_factory=lambda: {"knee": 8, "ankle": 6, "shoulder": 10})
    noise: float = 0.004


@dataclass
class SynthConfig:
    seed: int = 0
    n_patients: int = 60
    joints: list[str] = field(default_factory=lambda: list(JOINTS))
    joint_weights: list[float] = field(default_factory=lambda: [0.5, 0.25, 0.25])
    planes: list[str] = field(default_factory=lambda: list(PLANES))
    # (slices, rows, cols) per plane: few thick slices, fine in-plane grid.
    shape: dict[str, list[int]] = field(default_factory=lambda: {p: [16, 64, 64] for p in PLANES})
    slab_mm: float = 96.0        # coverage along the slice direction
    fov_mm: float = 140.0        # in-plane field of view
    sub_slices: int = 3          # samples across a slice's thickness (partial volume)
    protocol_jitter: float = 0.08
    plane_missing_rate: float = 0.05
    label_missing_rate: float = 0.03
    followup_rate: float = 0.2   # patients with a second exam of the same joint
    sites: list[str] = field(default_factory=lambda: sorted(SITES))
    finding_strength: float = 1.0
    mimics: int = 2
    kspace: KspaceConfig = field(default_factory=KspaceConfig)

    def validate(self) -> None:
        for j in self.joints:
            if j not in BUILDERS:
                raise ConfigError(f"synth.joints: unknown joint '{j}'; known: {', '.join(BUILDERS)}")
        if len(self.joint_weights) != len(self.joints):
            raise ConfigError("synth.joint_weights must have one weight per entry of synth.joints")
        for p in self.planes:
            if p not in PLANES:
                raise ConfigError(f"synth.planes: unknown plane '{p}'; known: {', '.join(PLANES)}")
            if len(self.shape.get(p, [])) != 3:
                raise ConfigError(f"synth.shape.{p} must be [slices, rows, cols]")
        for s in self.sites:
            if s not in SITES:
                raise ConfigError(f"synth.sites: unknown site '{s}'; known: {', '.join(sorted(SITES))}")
        for name in ("plane_missing_rate", "label_missing_rate", "followup_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"synth.{name} must be in [0, 1]")


def _hid(prefix: str, *parts) -> str:
    return prefix + hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:16]


@dataclass
class PatientPlan:
    index: int
    key: str
    joint: str
    site: str
    visits: int
    ehr: dict
    anatomy_seed: int


def plan_patient(cfg: SynthConfig, p: int) -> PatientPlan:
    rng = np.random.default_rng([cfg.seed, p])
    w = np.asarray(cfg.joint_weights, float)
    joint = cfg.joints[int(rng.choice(len(cfg.joints), p=w / w.sum()))]
    site = cfg.sites[int(rng.integers(len(cfg.sites)))]
    visits = 1 + int(rng.random() < cfg.followup_rate)
    ehr = draw_ehr(rng, joint)
    return PatientPlan(p, _hid("p", "synth", cfg.seed, p), joint, site, visits, ehr,
                       int(rng.integers(2**31)))


def iter_study_refs(cfg: SynthConfig) -> Iterator[tuple[PatientPlan, int, str]]:
    """(patient plan, visit, study key) for every study, in a fixed order."""
    for p in range(cfg.n_patients):
        plan = plan_patient(cfg, p)
        for v in range(plan.visits):
            yield plan, v, _hid("s", "synth", cfg.seed, p, v)


def _grid(cfg: SynthConfig, plane: str, rng: np.random.Generator) -> PlaneGrid:
    s, r, c = cfg.shape[plane]
    jit = 1 + rng.uniform(-cfg.protocol_jitter, cfg.protocol_jitter, 2)
    spacing = (cfg.slab_mm * jit[0] / s, cfg.fov_mm * jit[1] / r, cfg.fov_mm * jit[1] / c)
    return PlaneGrid(plane, (s, r, c), tuple(round(float(x), 4) for x in spacing), cfg.sub_slices)


def generate_study(cfg: SynthConfig, plan: PatientPlan, visit: int, key: str,
                   force_labels: dict[str, int] | None = None) -> tuple[dict, list[dict]]:
    """A study sample and its reconstruction slices (empty unless k-space is enabled)."""
    rng = np.random.default_rng([cfg.seed, plan.index, visit + 1])
    joint = plan.joint
    anatomy = BUILDERS[joint](np.random.default_rng(plan.anatomy_seed))
    ehr = dict(plan.ehr, age=round(plan.ehr["age"] + visit * float(rng.uniform(0.3, 2.0)), 1))
    truth, labels = draw_labels(rng, joint, ehr, cfg.label_missing_rate)
    if force_labels:
        unknown = set(force_labels) - set(LABELS[joint])
        if unknown:
            raise ValueError(f"force_labels: {sorted(unknown)} are not {joint} labels")
        truth.update(force_labels)
        labels.update({k: int(v) for k, v in force_labels.items()})
    params = {label: draw_params(rng) for label in LABELS[joint]}
    mimics = [mimic(anatomy, rng) for _ in range(cfg.mimics)]
    vendor, field_strength = SITES[plan.site]
    scanner = Scanner(vendor, field_strength, rng.normal(0, 0.12, 3).astype(np.float32))
    present = [p for p in cfg.planes if rng.random() >= cfg.plane_missing_rate] or [cfg.planes[0]]
    sample: dict = {"__key__": key}
    meta_planes, clean = {}, {}
    for plane in cfg.planes:
        grid = _grid(cfg, plane, rng)
        plane_rng = np.random.default_rng([cfg.seed, plan.index, visit + 1, PLANES.index(plane)])
        if plane not in present:
            continue
        contrast = protocol_contrast(joint, plane, plan.site)
        findings = [(lesion(lbl, anatomy, params[lbl]), hosts(lbl),
                     min(1.0, cfg.finding_strength * params[lbl].severity * VISIBILITY[lbl][plane]))
                    for lbl, y in truth.items() if y]
        findings += [(blob, host, amount * cfg.finding_strength) for blob, host, amount in mimics]
        image, seg, clean[plane] = render_plane(anatomy, grid, contrast, findings, scanner, plane_rng)
        sample[plane], sample[f"{plane}.seg"] = image, seg
        meta_planes[plane] = {"spacing": list(grid.spacing), "shape": list(grid.shape),
                              "contrast": contrast}
    sample["meta"] = {"study": key, "patient": plan.key, "joint": joint, "site": plan.site,
                      "field_strength": field_strength, "vendor": vendor, "source": "synth",
                      "visit": visit, "body_part": joint.upper(), "planes": meta_planes,
                      "structures": list(STRUCTURES[joint])}
    sample["labels"] = labels
    sample["ehr"] = ehr
    recon = _recon_slices(cfg, sample, clean, rng) if cfg.kspace.enabled else []
    return sample, recon


def _recon_slices(cfg: SynthConfig, sample: dict, clean: dict, rng: np.random.Generator) -> list[dict]:
    meta = sample["meta"]
    n_coils = int(cfg.kspace.coils.get(meta["joint"], 8))
    candidates = [(plane, idx) for plane, vol in clean.items()
                  for idx in range(vol.shape[0] // 4, max(vol.shape[0] // 4 + 1, 3 * vol.shape[0] // 4))]
    picks = rng.choice(len(candidates), size=min(cfg.kspace.slices_per_study, len(candidates)), replace=False)
    out = []
    for plane, idx in (candidates[int(i)] for i in picks):  # distinct slices: keys stay unique
        kspace, target = simulate_kspace(clean[plane][idx], n_coils, cfg.kspace.noise, rng)
        contrast = meta["planes"][plane]["contrast"]
        out.append({"__key__": f"{meta['study']}-{plane}{idx:03d}", "kspace": kspace, "target": target,
                    "seg": sample[f"{plane}.seg"][idx],
                    "meta": {"anatomy": meta["joint"], "joint": meta["joint"], "structures": meta["structures"], "contrast": contrast, "orientation": plane,
                             "coils": n_coils, "acquisition": f"{plane.upper()}_{contrast}",
                             "study": meta["study"], "patient": meta["patient"], "slice": idx,
                             "max": float(target.max()), "site": meta["site"],
                             "field_strength": meta["field_strength"], "vendor": meta["vendor"],
                             "spacing": meta["planes"][plane]["spacing"][1:]}})
    return out
