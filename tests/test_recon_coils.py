"""Coil combination round trips (RSS, SENSE, ESPIRiT), coil compression, pre-whitening; fastMRI metrics."""

import numpy as np
import pytest
from fastmri.evaluate import nmse, psnr, ssim
from skimage.metrics import structural_similarity

from pretrain.recon.coils import (compress_coils, espirit_maps, gcc_matrices, normalise, outer_kspace_noise, prewhiten, rss,
                                  sense_combine, to_image, whitening_matrix)
from pretrain.recon.metrics import VolumeAccumulator, summarise, volume_metrics
from tests.recon_data import phantom_slice


@pytest.fixture(scope="module")
def slice_data():
    return phantom_slice((48, 40), coils=6)


def test_rss_and_sense_with_true_maps(slice_data):
    k, maps, image = slice_data
    coil_images = to_image(k)
    assert np.allclose(coil_images, maps * image, atol=1e-5)
    assert np.allclose(rss(coil_images), np.sqrt((np.abs(maps * image) ** 2).sum(0)), atol=1e-5)
    sense = sense_combine(coil_images, maps)
    assert np.abs(sense - image).max() < 1e-4


def test_espirit_sense_reproduces_image(slice_data):
    k, _, image = slice_data
    maps = espirit_maps(k, calib_width=16)
    sense = sense_combine(to_image(k), maps)
    obj = np.abs(image) > 0.05
    rel = np.linalg.norm((np.abs(sense) - np.abs(image))[obj]) / np.linalg.norm(image[obj])
    assert rel < 1e-2, f"ESPIRiT SENSE magnitude error {rel:.3g}"
    assert np.allclose((np.abs(maps) ** 2).sum(0)[obj], 1, atol=1e-3)


def test_coil_compression_preserves_rss(slice_data):
    k, _, _ = slice_data
    ref = rss(to_image(k))
    virtual = compress_coils(k, 4)
    assert virtual.shape == (4, *k.shape[1:])
    assert np.linalg.norm(rss(to_image(virtual)) - ref) / np.linalg.norm(ref) < 0.01
    assert np.allclose(rss(to_image(compress_coils(k, 6))), ref, rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="virtual coils"):
        compress_coils(k, 7)


def test_geometric_coil_compression_beats_svd_and_aligns():
    """Zhang et al. 2013: per-readout-position matrices keep more of the image than one SVD matrix."""
    k, _, _ = phantom_slice((64, 48), coils=8, noise=1e-3)
    ref = rss(to_image(k))

    def rss_error(virtual):
        return np.linalg.norm(rss(to_image(virtual)) - ref) / np.linalg.norm(ref)

    for n in (1, 2, 3):
        gcc, svd = rss_error(compress_coils(k, n, "gcc")), rss_error(compress_coils(k, n, "svd"))
        assert gcc < 0.7 * svd, (n, gcc, svd)
    assert rss_error(compress_coils(k, 2, "gcc")) < 0.01
    assert rss_error(compress_coils(k, 2, "gcc", calib_cols=16)) < 0.01
    assert rss_error(compress_coils(k, 8, "gcc")) < 1e-5
    assert compress_coils(k, 3, "gcc").shape == (3, 64, 48)

    def roughness(mats):
        return np.mean([np.linalg.norm(mats[x] - mats[x - 1]) for x in range(1, len(mats))])

    assert roughness(gcc_matrices(k, 3)) < 0.5 * roughness(gcc_matrices(k, 3, align=False))
    with pytest.raises(ValueError, match="unknown coil compression 'pca'; known: svd, gcc"):
        compress_coils(k, 2, "pca")


def test_prewhitening_decorrelates_noise():
    rng = np.random.default_rng(0)
    mix = np.array([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.1, 0.3, 2.0]])
    noise = mix @ (rng.normal(size=(3, 4000)) + 1j * rng.normal(size=(3, 4000)))
    w = whitening_matrix(noise)
    white = w @ noise
    assert np.allclose(white @ white.conj().T / white.shape[1], np.eye(3), atol=1e-6)
    k = (mix @ (rng.normal(size=(3, 64 * 64)) + 1j * rng.normal(size=(3, 64 * 64)))).reshape(3, 64, 64)
    cov = np.cov(outer_kspace_noise(prewhiten(k)))
    assert np.allclose(cov, np.eye(3), atol=0.15)


def test_normalise_options(slice_data):
    k, _, _ = slice_data
    zf = rss(to_image(k))
    scaled, scale = normalise(k, "max", zf)
    assert scale == pytest.approx(zf.max()) and rss(to_image(scaled)).max() == pytest.approx(1, rel=1e-4)
    assert normalise(k, "none", zf)[1] == 1.0
    with pytest.raises(ValueError, match="unknown normalisation"):
        normalise(k, "l2", zf)


def test_metrics_match_fastmri_reference():
    rng = np.random.default_rng(1)
    gt = rng.random((3, 24, 24)).astype(np.float32) + 1
    pred = np.pad(gt + 0.1 * rng.normal(size=gt.shape), ((0, 0), (4, 4), (2, 2)))  # recon on a larger grid
    ours = volume_metrics(gt, pred)
    crop = pred[:, 4:28, 2:26]
    assert ours["nmse"] == pytest.approx(nmse(gt.astype(np.float64), crop))
    assert ours["psnr"] == pytest.approx(psnr(gt.astype(np.float64), crop))
    assert ours["ssim"] == pytest.approx(float(ssim(gt.astype(np.float64), crop)[0]))
    per_slice = np.mean([structural_similarity(g, p, data_range=gt.max()) for g, p in zip(gt, crop)])
    assert ours["ssim"] == pytest.approx(per_slice, rel=1e-6)  # data range = volume maximum
    acc = VolumeAccumulator()
    for i in (2, 0, 1):
        acc.add("vol", "knee", "m", i, gt[i], pred[i])
    rows = acc.per_volume()
    assert rows[0]["ssim"] == pytest.approx(ours["ssim"]) and summarise(rows)[0]["volumes"] == 1


def test_sense_combination_selected_from_config(slice_data):
    """``model.recon.combine: sense`` reaches ESPIRiT + SENSE: the target is |SENSE| with sigpy's ESPIRiT maps
    (the object itself), the zero-filled image uses the same maps; an unknown choice names the key."""
    from pretrain.recon.objective import transform_config
    from pretrain.recon.transforms import ReconTransform
    from shards.config import ConfigError

    k, maps, image = slice_data
    sample = {"__key__": "s-x-sag000", "kspace": k, "meta": {}}
    cfg = transform_config({"combine": "sense", "espirit": {"calib_width": 16}, "normalisation": "none"})
    item = ReconTransform(cfg)(sample)
    rss_item = ReconTransform(transform_config({"normalisation": "none"}))(sample)
    expected = np.abs(sense_combine(to_image(k), espirit_maps(k, calib_width=16)))
    assert np.allclose(item["target"].numpy(), expected, atol=1e-6)
    assert np.allclose(rss_item["target"].numpy(), rss(to_image(k)), atol=1e-6)
    obj = np.abs(image) > 0.05
    assert np.linalg.norm((item["target"].numpy() - np.abs(image))[obj]) / np.linalg.norm(image[obj]) < 1e-2
    assert item["zero_filled"].shape == item["target"].shape
    assert not np.allclose(item["zero_filled"].numpy(), rss_item["zero_filled"].numpy())
    with pytest.raises(ConfigError, match="model.recon.*combine 'bart'"):
        transform_config({"combine": "bart"})
    with pytest.raises(ConfigError, match="espirit key"):
        transform_config({"combine": "sense", "espirit": {"calib": 3}})
