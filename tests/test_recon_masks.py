"""Undersampling masks: acceleration and centre within tolerance, seeded reproducibility, fastMRI cross-check."""

import numpy as np
import pytest
import torch
from fastmri.data.subsample import EquispacedMaskFractionFunc, RandomMaskFunc
from fastmri.data.transforms import apply_mask

from pretrain.recon.masks import MASK_KINDS, MaskSpec, acceleration_of, make_mask, slice_seed
from pretrain.recon.transforms import ReconTransform, ReconTransformConfig
from tests.recon_data import phantom_slice

SHAPE = (64, 96)
RETRO = [k for k in MASK_KINDS if k not in ("stored", "full")]


@pytest.mark.parametrize("kind", RETRO)
@pytest.mark.parametrize("acc,cf", [(4, 0.08), (8, 0.04)])
def test_acceleration_centre_and_seed(kind, acc, cf):
    spec = MaskSpec(kind, acc, cf)
    seeds = range(12) if kind == "random1d" else range(2)
    masks = [make_mask(spec, SHAPE, s) for s in seeds]
    achieved = np.mean([acceleration_of(m) for m in masks]) if kind != "random1d" else \
        SHAPE[0] * SHAPE[1] * len(masks) / sum(int(m.sum()) for m in masks)
    assert abs(achieved - acc) / acc < 0.1, f"{kind}: achieved {achieved:.2f} for nominal {acc}"
    n = max(1, round(SHAPE[1] * cf))
    c0 = (SHAPE[1] - n + 1) // 2
    rows = slice(None) if kind.endswith("1d") else slice((SHAPE[0] - round(SHAPE[0] * cf) + 1) // 2,
                                                          (SHAPE[0] - round(SHAPE[0] * cf) + 1) // 2 + 1)
    assert masks[0][rows, c0:c0 + n].all(), "fully sampled centre missing"
    assert np.array_equal(make_mask(spec, SHAPE, 7), make_mask(spec, SHAPE, 7))
    if kind.endswith("1d"):
        assert (masks[0] == masks[0][:1]).all(), "1D masks sample whole columns"


@pytest.mark.parametrize("kind", RETRO)
def test_partial_fourier_drops_leading_columns(kind):
    full = make_mask(MaskSpec(kind, 4, 0.08), SHAPE, 3)
    pf = make_mask(MaskSpec(kind, 4, 0.08, partial_fourier=0.75), SHAPE, 3)
    cut = round(0.25 * SHAPE[1])
    assert not pf[:, :cut].any() and np.array_equal(pf[:, cut:], full[:, cut:])
    assert acceleration_of(pf) > acceleration_of(full)


def test_stored_mask_and_shape_mismatch():
    stored = np.zeros(SHAPE[1], np.uint8)
    stored[::3] = 1
    mask = make_mask(MaskSpec("stored"), SHAPE, 0, stored=stored)
    assert mask.shape == SHAPE and mask[:, ::3].all() and not mask[:, 1::3].any()
    with pytest.raises(ValueError, match="does not match k-space grid"):
        make_mask(MaskSpec("stored"), SHAPE, 0, stored=np.ones(SHAPE[1] + 1))
    with pytest.raises(ValueError, match="needs a mask stored"):
        make_mask(MaskSpec("stored"), SHAPE, 0)
    with pytest.raises(ValueError, match="unknown mask kind"):
        make_mask(MaskSpec("radial"), SHAPE, 0)


@pytest.mark.parametrize("kind,ref", [("equispaced1d", EquispacedMaskFractionFunc), ("random1d", RandomMaskFunc)])
def test_matches_fastmri_apply_mask(kind, ref):
    """Our transform's masked k-space equals fastMRI's apply_mask with its mask function and seed."""
    k, _, _ = phantom_slice((32, 40), coils=3)
    key = "s-demo-sag004"
    tcfg = ReconTransformConfig(masks=[{"kind": kind, "acceleration": 4, "center_fraction": 0.08}],
                                normalisation="none")
    ours = ReconTransform(tcfg)({"__key__": key, "kspace": k})
    seed = slice_seed(key, 0)
    theirs, mask, nlf = apply_mask(torch.view_as_real(torch.from_numpy(k)), ref([0.08], [4]), seed=seed)
    assert torch.allclose(ours["masked_kspace"], theirs)
    assert ours["num_low_frequencies"] >= nlf


def test_equispaced_mask_with_undefined_spacing_is_a_clear_error():
    from pretrain.recon.masks import MaskSpec, make_mask

    with pytest.raises(ValueError, match="12 centre lines x acceleration 4 equals the 48 columns"):
        make_mask(MaskSpec(kind="equispaced1d", acceleration=4, center_fraction=0.24), (48, 48), seed=0)


def test_full_mask_is_fully_sampled():
    mask = make_mask(MaskSpec(kind="full"), (16, 12), seed=3)
    assert mask.all() and acceleration_of(mask) == 1.0
