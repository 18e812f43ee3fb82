"""Reconstruction backbones (fastMRI VarNet, U-Net) as diffusers models; transforms and bad input."""

import numpy as np
import pytest
import torch

from pretrain.models import BACKBONES
from pretrain.recon.transforms import ReconInputError, ReconTransform, ReconTransformConfig, collate_recon
from tests.recon_data import phantom_slice

TINY = {"varnet": dict(num_cascades=2, sens_chans=4, sens_pools=2, chans=4, pools=2),
        "unet-recon": dict(chans=4, pools=2)}


def _sample(key="s-a-sag001", coils=4, shape=(32, 32), **meta):
    k, _, _ = phantom_slice(shape, coils)
    from pretrain.recon.coils import rss, to_image
    return {"__key__": key, "kspace": k, "target": rss(to_image(k)), "meta": {"coils": coils, "slice": 1, **meta}}


@pytest.mark.parametrize("name", list(TINY))
def test_backbone_forward_features_roundtrip(name, tmp_path):
    torch.manual_seed(0)
    model = BACKBONES[name](**TINY[name]).eval()
    tf = ReconTransform(ReconTransformConfig(masks=[{"kind": "poisson2d", "acceleration": 4, "center_fraction": 0.1}]))
    batch = collate_recon([tf(_sample("s-a")), tf(_sample("s-b"))])
    args = (batch["masked_kspace"], batch["mask"], batch["num_low_frequencies"])
    with torch.no_grad():
        out = model(*args)
        feats = model.features(*args)
    assert out.shape == (2, 32, 32) and torch.isfinite(out).all()
    assert list(feats) == model.block_names()
    prefix = "cascade0/" if name == "varnet" else ""
    assert feats[f"{prefix}down.0"].shape[:2] == (2, 4) and feats[f"{prefix}mid"].shape[1] == 16
    with pytest.raises(ValueError, match="unknown feature block"):
        model.features(*args, blocks="nope")
    model.save_pretrained(tmp_path / name)
    again = type(model).from_pretrained(tmp_path / name).eval()
    with torch.no_grad():
        assert torch.allclose(again(*args), out, atol=1e-5)


def test_varnet_batch_mixing_accelerations_matches_one_slice_at_a_time():
    """Each slice's sensitivities come from its own centre, not the narrowest centre of the batch."""
    torch.manual_seed(0)
    model = BACKBONES["varnet"](**TINY["varnet"]).eval()
    masks = [{"kind": "equispaced1d", "acceleration": 4, "center_fraction": 0.2},
             {"kind": "equispaced1d", "acceleration": 8, "center_fraction": 0.1}]
    tf = ReconTransform(ReconTransformConfig(masks=masks))
    items = [tf(_sample(k)) for k in ("s-a", "s-b", "s-c", "s-d", "s-e")]
    widths = {it["num_low_frequencies"] for it in items}
    assert len(widths) > 1, widths
    batch = collate_recon(items)
    with torch.no_grad():
        together = model(batch["masked_kspace"], batch["mask"], batch["num_low_frequencies"])
        alone = [model(b["masked_kspace"], b["mask"], b["num_low_frequencies"])
                 for b in (collate_recon([it]) for it in items)]
    assert torch.allclose(together, torch.cat(alone), atol=1e-5)


@pytest.mark.parametrize("compression", ["svd", "gcc"])
def test_transform_grid_and_virtual_coils_make_mixed_slices_batchable(compression):
    tf = ReconTransform(ReconTransformConfig(grid=[32, 32], virtual_coils=3, coil_compression=compression))
    items = [tf(_sample("s-a", coils=4, shape=(40, 32))), tf(_sample("s-b", coils=6, shape=(32, 28)))]
    batch = collate_recon(items)
    assert batch["masked_kspace"].shape == (2, 3, 32, 32, 2) and batch["target"].shape == (2, 32, 32)
    plain = ReconTransform(ReconTransformConfig())
    with pytest.raises(ReconInputError, match="batch mixes k-space shapes"):
        collate_recon([plain(_sample("s-a", coils=4)), plain(_sample("s-b", coils=6))])
    with pytest.raises(ReconInputError, match="fewer than virtual_coils"):
        ReconTransform(ReconTransformConfig(virtual_coils=8))(_sample("s-c", coils=4))
    with pytest.raises(ValueError, match="unknown coil_compression 'pca'"):
        ReconTransform(ReconTransformConfig(coil_compression="pca"))


def test_validation_masks_are_reproducible():
    tf = ReconTransform(ReconTransformConfig(masks=[{"kind": "gaussian2d", "acceleration": 8, "center_fraction": 0.04}]))
    a, b = tf(_sample("s-x")), tf(_sample("s-x"))
    assert torch.equal(a["mask"], b["mask"]) and not torch.equal(a["mask"], tf(_sample("s-y"))["mask"])
    assert not torch.equal(ReconTransform(tf.cfg, epoch=1)(_sample("s-x"))["mask"], a["mask"])


@pytest.mark.parametrize("mutate,match", [
    (lambda s: s["kspace"].__setitem__((0, 3, 3), np.inf), r"sample 's-a-sag001' \(study s1, slice 1\): kspace contains NaN"),
    (lambda s: s["meta"].__setitem__("coils", 8), "meta says 8 coils, k-space has 4"),
    (lambda s: s.__setitem__("mask", np.ones((5, 5))), "mask shape \\(5, 5\\) does not match k-space grid"),
    (lambda s: s.__setitem__("target", np.zeros((40, 40), np.float32)), "target shape"),
])
def test_bad_samples_are_named(mutate, match):
    sample = _sample(study="s1")
    mutate(sample)
    with pytest.raises(ReconInputError, match=match):
        ReconTransform(ReconTransformConfig())(sample)


def test_recon_backbone_loads_as_volume_feature_extractor(tmp_path):
    """``load_backbone`` gives a published VarNet the diffusion backbones' feature interface: per-slice maps
    stacked over slices, independent of the batch; the random-init baseline rebuilds the same architecture."""
    from downstream.features import backbone_identity
    from downstream.inputs import random_copy
    from pretrain.publish import load_backbone
    from pretrain.recon.publish import publish_recon_backbone

    torch.manual_seed(0)
    published = BACKBONES["varnet"](num_cascades=2, sens_chans=2, sens_pools=1, chans=2, pools=2)
    publish_recon_backbone(published, str(tmp_path / "v"), {}, {"kind": "recon"}, {"steps": 0})
    model, scheduler, pre = load_backbone(str(tmp_path / "v"))
    assert scheduler is None and pre is None and model.block_names() == published.block_names()
    volumes = torch.rand(2, 1, 5, 24, 20) * 3 - 1
    with torch.no_grad():
        maps = model.features(volumes, None, ["cascade1/mid", "cascade0/up.1"])
        alone = model.features(volumes[1:], None, ["cascade1/mid"])
    assert maps["cascade0/up.1"].shape == (2, 2, 5, 32, 32)  # the NormUnet grid: padded to multiples of 16 and maps["cascade1/mid"].shape[:3] == (2, 8, 5)
    assert torch.allclose(maps["cascade1/mid"][1:], alone["cascade1/mid"], atol=1e-5)
    rnd = random_copy(model, 1)
    assert type(rnd) is type(model) and backbone_identity(rnd) != backbone_identity(model)
