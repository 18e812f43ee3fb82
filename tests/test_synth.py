"""The synthetic MSK generator: determinism, aligned label maps, prevalence, plane-specific findings."""

from __future__ import annotations

import numpy as np
import pytest

from shards.schema import PLANES, validate_study
from shards.synth import SynthConfig, generate_study, iter_study_refs, plan_patient
from shards.synth.anatomy import CONTRASTS, TISSUE
from shards.synth.findings import VISIBILITY, hosts
from shards.synth.vocab import LABELS, STRUCTURES, synth_declaration
from shards.synth.population import PREVALENCE, draw_ehr, draw_labels

TINY = {p: [8, 32, 32] for p in PLANES}


def _first(cfg: SynthConfig, joint: str):
    for plan, visit, key in iter_study_refs(cfg):
        if plan.joint == joint:
            return plan, visit, key
    raise AssertionError(f"no {joint} study")


@pytest.mark.parametrize("joint", ["knee", "ankle", "shoulder"])
def test_study_is_deterministic_and_valid(joint):
    cfg = SynthConfig(n_patients=12, shape=TINY, plane_missing_rate=0.0)
    a, _ = generate_study(cfg, *_first(cfg, joint))
    b, _ = generate_study(cfg, *_first(cfg, joint))
    validate_study(a, synth_declaration())
    assert a["__key__"] == b["__key__"] and a["labels"] == b["labels"] and a["ehr"] == b["ehr"]
    for p in PLANES:
        np.testing.assert_array_equal(a[p], b[p])
        assert a[p].dtype == np.float32 and a[p].shape == tuple(TINY[p])
    other, _ = generate_study(SynthConfig(seed=1, n_patients=12, shape=TINY, plane_missing_rate=0.0),
                              *_first(SynthConfig(seed=1, n_patients=12, shape=TINY), joint))
    assert not np.array_equal(other["sag"], a["sag"])


def test_each_plane_has_its_own_anisotropic_spacing():
    cfg = SynthConfig(n_patients=4, shape={"sag": [8, 32, 32], "cor": [6, 40, 40], "ax": [10, 48, 40]},
                      plane_missing_rate=0.0)
    sample, _ = generate_study(cfg, *next(iter_study_refs(cfg)))
    for p in PLANES:
        spacing = sample["meta"]["planes"][p]["spacing"]
        assert sample[p].shape == tuple(cfg.shape[p])
        assert spacing[0] > 1.5 * spacing[1], "thick slices, fine in-plane grid"
    assert len({tuple(sample["meta"]["planes"][p]["spacing"]) for p in PLANES}) == 3


@pytest.mark.parametrize("joint", ["knee", "ankle", "shoulder"])
def test_label_map_is_aligned_with_the_image(joint):
    """Structures of the label map carry their tissue's signal: fluid bright and tendons dark
    on fat-suppressed images, in every plane."""
    cfg = SynthConfig(n_patients=16, shape={p: [12, 48, 48] for p in PLANES}, plane_missing_rate=0.0,
                      mimics=0)
    plan, visit, key = _first(cfg, joint)
    sample, _ = generate_study(cfg, plan, visit, key, force_labels={k: 0 for k in LABELS[joint]})
    names = STRUCTURES[joint]
    assert len(names) >= 12 and (joint != "knee" or len(names) - 1 >= 8)
    for p in PLANES:
        img, seg = sample[p], sample[f"{p}.seg"]
        assert seg.shape == img.shape and seg.max() < len(names)
        contrast = sample["meta"]["planes"][p]["contrast"]
        table = CONTRASTS[contrast]
        means = {TISSUE[names[i]]: img[seg == i].mean() for i in np.unique(seg)}
        assert means["air"] < 0.15
        order = sorted(means, key=lambda t: table[t])
        # the darkest and brightest tissues by the contrast table are darkest/brightest in the image
        assert means[order[-1]] > means[order[1]]
        assert means["muscle"] > means["air"]


@pytest.mark.parametrize("joint", ["knee", "ankle", "shoulder"])
def test_prevalence_matches_targets(joint):
    rng = np.random.default_rng(7)
    n = 3000
    counts = {k: 0 for k in LABELS[joint]}
    for _ in range(n):
        truth, _ = draw_labels(rng, joint, draw_ehr(rng, joint), 0.0)
        for k, v in truth.items():
            counts[k] += v
    for label, target in PREVALENCE[joint].items():
        tol = 4 * np.sqrt(target * (1 - target) / n) + 0.01
        assert abs(counts[label] / n - target) < tol, (label, counts[label] / n, target)


def test_labels_can_be_unknown_and_ehr_correlates_without_giving_labels_away():
    rng = np.random.default_rng(3)
    ages, bml, unknown = [], [], 0
    for _ in range(2000):
        ehr = draw_ehr(rng, "knee")
        truth, observed = draw_labels(rng, "knee", ehr, 0.05)
        unknown += sum(v is None for v in observed.values())
        ages.append(ehr["age"])
        bml.append(truth["cartilage_bml"])
    ages, bml = np.array(ages), np.array(bml)
    assert 0.03 < unknown / (2000 * 8) < 0.07
    assert ages[bml == 1].mean() > ages[bml == 0].mean() + 3  # older knees: more cartilage lesions
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(bml, ages) < 0.85  # informative, not decisive


@pytest.mark.parametrize("joint,label", [("knee", "acl"), ("knee", "mcl"), ("knee", "effusion"),
                                         ("ankle", "atfl"), ("ankle", "achilles"),
                                         ("shoulder", "supraspinatus"), ("shoulder", "subscapularis")])
def test_finding_is_visible_in_the_planes_radiologists_read(joint, label):
    cfg = SynthConfig(n_patients=30, shape={p: [12, 48, 48] for p in PLANES}, plane_missing_rate=0.0)
    plan, visit, key = _first(cfg, joint)
    on, _ = generate_study(cfg, plan, visit, key, force_labels={label: 1})
    off, _ = generate_study(cfg, plan, visit, key, force_labels={label: 0})
    change = {}
    for p in PLANES:  # lesion volume x signal change, per unit of fluid-vs-host contrast
        table = CONTRASTS[on["meta"]["planes"][p]["contrast"]]
        gap = np.mean([abs(table["fluid"] - table[TISSUE[h]]) for h in hosts(label) if TISSUE[h] != "fluid"])
        change[p] = float(np.abs(on[p] - off[p]).sum() * np.prod(on["meta"]["planes"][p]["spacing"]) / gap)
    best = max(VISIBILITY[label], key=VISIBILITY[label].get)
    worst = min(VISIBILITY[label], key=VISIBILITY[label].get)
    assert change[best] > 0
    assert change[best] == max(change.values()), change
    assert change[worst] < 0.6 * change[best], change
    for other in LABELS[joint]:
        if other != label:
            assert on["labels"][other] == off["labels"][other]


def test_kspace_slices_follow_the_fastmri_convention():
    from shards.synth.kspace import ifft2c, rss

    cfg = SynthConfig(n_patients=3, shape=TINY)
    cfg.kspace.enabled = True
    sample, recon = generate_study(cfg, *next(iter_study_refs(cfg)))
    assert len(recon) == cfg.kspace.slices_per_study
    for r in recon:
        coils = cfg.kspace.coils[sample["meta"]["joint"]]
        assert r["kspace"].dtype == np.complex64 and r["kspace"].shape == (coils, 32, 32)
        np.testing.assert_allclose(rss(ifft2c(r["kspace"])), r["target"], rtol=1e-4, atol=1e-6)
        assert r["meta"]["coils"] == coils and r["meta"]["anatomy"] == sample["meta"]["joint"]
        assert r["__key__"].startswith(sample["__key__"])


def test_patients_keep_their_joint_site_and_record_across_visits():
    cfg = SynthConfig(n_patients=40, shape=TINY, followup_rate=0.5)
    refs = list(iter_study_refs(cfg))
    assert len(refs) > 40 and len({k for _, _, k in refs}) == len(refs)
    plan = next(p for p, v, _ in refs if v == 1)
    assert plan_patient(cfg, plan.index).joint == plan.joint
