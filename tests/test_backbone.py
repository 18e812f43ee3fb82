"""Backbone, noise schedule, preprocessing and publishing (tiny configs, seeded)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from pretrain.models import BACKBONES, DiffusionBackbone
from pretrain.preprocess import PlanePreprocessing, preprocess_volume, spec_from_manifest
from pretrain.publish import load_backbone, publish_backbone
from pretrain.schedule import ScheduleConfig, build_scheduler, training_target
from shards.writer import ShardWriter

TINY = dict(channels=(4, 8), attention_levels=(False, True), num_res_blocks=1, num_head_channels=8,
            norm_num_groups=4)
SHAPE = (8, 16, 16)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """A real manifest (ShardWriter statistics) over four random two-joint studies."""
    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("shards")
    with ShardWriter(out, kind="study", info={"source": "synthetic"}) as w:
        for i in range(4):
            joint = ("knee", "ankle")[i % 2]
            planes = {p: {"spacing": [3.0, 0.5, 0.5], "shape": [10, 20, 24], "contrast": "PD"}
                      for p in ("sag", "cor", "ax")}
            sample = {"__key__": f"s-{i:03d}", "meta": {"joint": joint, "patient": f"p{i}", "site": "a",
                                                        "field_strength": 3.0, "vendor": "v", "planes": planes}}
            for p in planes:
                sample[p] = (rng.random((10, 20, 24)) * 100).astype(np.float32)
            w.write(sample, "train")
    return json.loads((out / "manifest.json").read_text())


def tiny_backbone(manifest, plane="sag", seed=0, **schedule) -> DiffusionBackbone:
    torch.manual_seed(seed)
    spec = spec_from_manifest(manifest, plane, SHAPE)
    model = DiffusionBackbone(**TINY, plane=plane, preprocessing=spec.to_dict(), schedule=schedule or None)
    torch.nn.init.normal_(model.unet.out[2].conv.weight, std=0.1)  # MONAI zero-inits the output conv
    return model.eval()


@pytest.mark.parametrize("plane", ["sag", "cor", "ax"])
def test_plane_backbone_shapes(manifest, plane):
    model = tiny_backbone(manifest, plane)
    assert BACKBONES["diffusion3d"] is DiffusionBackbone
    vol = np.random.default_rng(1).random((10, 20, 24)).astype(np.float32) * 100
    x = preprocess_volume(vol, model.preprocessing)
    assert x.shape == (1, *SHAPE) and x.dtype == torch.float32
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    x = x[None].repeat(2, 1, 1, 1, 1)
    assert model(x, torch.tensor([0, 999])).shape == x.shape
    with torch.no_grad():
        feats = model.features(x, [10, 500])
    names = model.block_names()
    assert names == ["down.0", "down.1", "mid_0", "mid_1", "mid_2", "mid", "up.0", "up.1"]
    assert sorted(feats) == sorted(f"t{t}/{b}" for t in (10, 500) for b in names)
    for b in names:
        s = model.block_strides()[b]
        assert feats[f"t10/{b}"].shape == (2, model.block_channels()[b], *(d // s for d in SHAPE))


def manual_noise(seed):
    return torch.randn((1, 1, *SHAPE), generator=torch.Generator().manual_seed(seed))


def test_features_seeded_batch_invariant_and_averaged(manifest):
    model = tiny_backbone(manifest)
    x = torch.randn(2, 1, *SHAPE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = model.features(x, 200, ["mid", "up.1"], seed=7)
        b = model.features(x, 200, ["mid", "up.1"], seed=7)
        c = model.features(x, 200, ["mid", "up.1"], seed=8)
        single = model.features(x[:1], [50, 200], ["mid"], seed=7)
        two = model.features(x, 200, ["mid"], noise_draws=2, seed=7)
    assert torch.equal(a["t200/mid"], b["t200/mid"]) and torch.equal(a["t200/up.1"], b["t200/up.1"])
    assert not torch.allclose(a["t200/mid"], c["t200/mid"])
    torch.testing.assert_close(single["t200/mid"], a["t200/mid"][:1])
    # noise_draws=2: the mean over the first two draws of the seeded generator, as documented
    gen, sched, t = torch.Generator().manual_seed(7), model.make_scheduler(), torch.tensor([200, 200])
    manual = []
    with torch.no_grad(), model._capture(["mid"]) as store:
        for _ in range(2):
            noise = torch.randn((1, 1, *SHAPE), generator=gen)
            model.unet(sched.add_noise(x, noise.expand_as(x), t), t)
            manual.append(store["mid"])
    torch.testing.assert_close(two["t200/mid"], (manual[0] + manual[1]) / 2)
    torch.testing.assert_close(manual[0], a["t200/mid"])
    assert not torch.allclose(two["t200/mid"], a["t200/mid"])
    # stopping after the last requested block changes nothing; full forward hooks see the same maps
    with torch.no_grad(), model._capture(["down.1", "up.1"]) as store:
        model.unet(sched.add_noise(x, manual_noise(7).expand_as(x), t), t)
        full = dict(store)
        early = model.features(x, torch.tensor(200), ["down.1", "up.1"], seed=7)
    assert torch.equal(full["down.1"], early["t200/down.1"]) and torch.equal(full["up.1"], early["t200/up.1"])


def test_features_allow_grad_and_reject_bad_input(manifest):
    model = tiny_backbone(manifest).train()
    x = torch.randn(1, 1, *SHAPE)
    model.features(x, 5, "down.1")["t5/down.1"].mean().backward()
    assert model.unet.down_blocks[1].resnets[0].conv1.conv.weight.grad is not None
    with pytest.raises(ValueError, match=r"valid: down\.0, down\.1, mid_0, mid_1, mid_2, mid, up\.0, up\.1"):
        model.features(x, 5, ["mid", "encoder.9"])
    with pytest.raises(ValueError, match="outside"):
        model.features(x, 1000, "mid")
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.randn(1, 1, 7, 16, 16), torch.tensor([1]))


def test_middle_block_parts(manifest):
    """mid_0/mid_1/mid_2: after the middle block's first resnet, its attention, its second resnet."""
    model = tiny_backbone(manifest)
    x = torch.randn(2, 1, *SHAPE, generator=torch.Generator().manual_seed(4))
    mid = model.unet.middle_block
    seen = {}
    hooks = [getattr(mid, part).register_forward_hook(lambda m, a, o, part=part: seen.setdefault(part, o))
             for part in ("resnet_1", "attention", "resnet_2")]
    with torch.no_grad():
        feats = model.features(x, 30, ["mid_0", "mid_1", "mid_2", "mid"], seed=1)
    for h in hooks:
        h.remove()
    assert torch.equal(feats["t30/mid_0"], seen["resnet_1"]) and torch.equal(feats["t30/mid_1"], seen["attention"])
    assert torch.equal(feats["t30/mid_2"], feats["t30/mid"])
    assert not torch.allclose(feats["t30/mid_0"], feats["t30/mid_1"])
    for name in ("mid_0", "mid_1", "mid_2"):
        s = model.block_strides()[name]
        assert feats[f"t30/{name}"].shape == (2, model.block_channels()[name], *(d // s for d in SHAPE))


@pytest.mark.parametrize("blocks", [["down.0"], ["down.1"], ["down.0", "mid_0"], ["mid_1"]])
def test_features_stop_after_the_last_requested_block(manifest, blocks):
    """The U-Net's decoder and output layer never run when only earlier blocks are requested
    (a reused name used to disable the early exit whenever a down.* block was asked for)."""
    model = tiny_backbone(manifest)
    calls = []
    hook = model.unet.out.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        feats = model.features(torch.randn(1, 1, *SHAPE), 10, blocks)
    hook.remove()
    assert calls == [] and sorted(feats) == sorted(f"t10/{b}" for b in blocks)


def test_per_volume_intensity_normalisation(manifest):
    spec = spec_from_manifest(manifest, "sag", SHAPE, intensity="volume", p_low=1.0, p_high=99.0)
    assert spec.low is None and spec.to_dict()["intensity"] == "volume"
    rng = np.random.default_rng(0)
    vol = rng.normal(50, 10, (8, 16, 16)).astype(np.float32)      # inside the manifest window (0..100)
    vol[0, 0, 0] = 1e6                                             # a hot voxel: clipped away
    out = preprocess_volume(vol, spec)[0].numpy()
    assert out.shape == SHAPE and abs(out.mean()) < 1e-4 and out.std() == pytest.approx(1, abs=1e-3)
    assert out.max() < 4
    # per volume: a rescaled scan (another scanner gain) gives the same input; the dataset window does not
    np.testing.assert_allclose(preprocess_volume(vol * 0.5 + 20, spec)[0].numpy(), out, atol=1e-4)
    window = spec_from_manifest(manifest, "sag", SHAPE)
    assert not np.allclose(preprocess_volume(vol * 0.5 + 20, window), preprocess_volume(vol, window), atol=0.05)
    model = DiffusionBackbone(**TINY, plane="sag", preprocessing=spec.to_dict())
    assert model.preprocessing.intensity == "volume"                # recorded in the backbone config
    with pytest.raises(ValueError, match="p_low/p_high"):
        PlanePreprocessing(plane="sag", intensity="volume", p_low=60, p_high=40).validate()


@pytest.mark.parametrize("beta", ["linear", "cosine"])
@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_schedule_targets(beta, kind):
    sched = build_scheduler(ScheduleConfig(beta_schedule=beta, prediction_type=kind))
    assert sched.config.beta_schedule == {"linear": "linear", "cosine": "squaredcos_cap_v2"}[beta]
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 1, *SHAPE, generator=g), torch.randn(3, 1, *SHAPE, generator=g)
    t = torch.tensor([0, 400, 999])
    target = training_target(sched, x0, noise, t)
    if kind == "epsilon":
        assert torch.equal(target, noise)
    else:
        torch.testing.assert_close(target, sched.get_velocity(x0, noise, t))
        acp = sched.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
        torch.testing.assert_close(target, acp.sqrt() * noise - (1 - acp).sqrt() * x0)


def test_schedule_rejects_unknown():
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        build_scheduler({"prediction_type": "sample"})
    with pytest.raises(ValueError, match="beta_schedule 'quadratic'"):
        build_scheduler({"beta_schedule": "quadratic"})
    from diffusers import DDPMScheduler

    x = torch.zeros(1, 1, 2, 2, 2)
    with pytest.raises(ValueError, match="unknown prediction_type 'sample'"):
        training_target(DDPMScheduler(prediction_type="sample"), x, x, torch.tensor([1]))


def test_preprocessing_from_manifest(manifest):
    spec = spec_from_manifest(manifest, "cor", SHAPE, spatial="pad_crop")
    inten = manifest["stats"]["planes"]["cor"]["intensity"]
    assert (spec.low, spec.high) == (inten["p0.5"], inten["p99.5"])
    assert spec_from_manifest(manifest, "ax").shape == [10, 20, 24]  # common_shape by default
    vol = np.full((4, 12, 40), spec.high * 2, dtype=np.float32)
    out = preprocess_volume(vol, spec.to_dict())
    assert out.shape == (1, *SHAPE)
    padded = max(-1.0, (0.0 - spec.low) / (spec.high - spec.low) * 2 - 1)  # raw zeros, then the window
    assert float(out[0, 0, 8, 8]) == pytest.approx(padded) and float(out[0, 1, 8, 8]) == pytest.approx(padded)
    assert float(out[0, 2, 8, 8]) == 1.0  # above the window: clipped
    with pytest.raises(ValueError, match="no statistics for plane 'obl'"):
        spec_from_manifest(manifest, "obl", SHAPE)
    with pytest.raises(ValueError, match="low/high are unset"):
        preprocess_volume(vol, PlanePreprocessing(plane="sag"))
    with pytest.raises(ValueError, match="unknown keys"):
        PlanePreprocessing.from_dict({**spec.to_dict(), "gamma": 2})
    with pytest.raises(ValueError, match="differs"):
        DiffusionBackbone(**TINY, plane="sag", preprocessing=spec.to_dict())


def test_save_pretrained_round_trip(manifest, tmp_path):
    model = tiny_backbone(manifest, "ax", beta_schedule="cosine", prediction_type="v_prediction")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = DiffusionBackbone.from_pretrained(tmp_path).eval()
    x, t = torch.randn(1, 1, *SHAPE), torch.tensor([321])
    with torch.no_grad():
        assert torch.equal(model(x, t), loaded(x, t))
    assert loaded.preprocessing == model.preprocessing
    assert loaded.make_scheduler().config.prediction_type == "v_prediction"
    assert loaded.config.schedule["beta_schedule"] == "cosine"


def _publish(manifest, url, **kw):
    model = tiny_backbone(manifest, "cor", prediction_type="v_prediction")
    return model, publish_backbone(model, model.make_scheduler(), url, {"optim": {"lr": 1e-4}, "steps": 3},
                                   manifest, {"steps": 3, "final_loss": 0.4321}, **kw)


def _check_loaded(model, url, **kw):
    loaded, sched, spec = load_backbone(url, **kw)
    x = torch.randn(1, 1, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(model.features(x, 100, "mid"), loaded.features(x, 100, "mid", scheduler=sched),
                                   rtol=0, atol=0)
    assert sched.config.prediction_type == "v_prediction" and spec == model.preprocessing


def test_publish_and_load_local(manifest, tmp_path):
    url = str(tmp_path / "hub" / "cor-v1")
    model, out = _publish(manifest, url)
    files = sorted(p.relative_to(out).as_posix() for p in (tmp_path / "hub" / "cor-v1").rglob("*") if p.is_file())
    assert files == ["README.md", "config.json", "diffusion_pytorch_model.safetensors", "metrics.json",
                     "scheduler/scheduler_config.json", "training_config.yaml"]
    card = (tmp_path / "hub" / "cor-v1" / "README.md").read_text()
    for text in ("plane `cor`", "Steps: 3", "Final loss: 0.4321", "knee: 2", "ankle: 2", "| cor | 4 | 10x20x24 |",
                 "v_prediction", '"intensity": "percentile"', "Research use only", "synthetic"):
        assert text in card, text
    assert "lr: 0.0001" in (tmp_path / "hub" / "cor-v1" / "training_config.yaml").read_text()
    _check_loaded(model, url)
    with pytest.raises(FileExistsError, match="cor-v1"):
        _publish(manifest, url)
    _publish(manifest, url, overwrite=True)


def test_load_without_deepspeed_or_ray(manifest, tmp_path):
    model, url = _publish(manifest, str(tmp_path / "cor-v1"))
    x = torch.randn(1, 1, *SHAPE, generator=torch.Generator().manual_seed(0))
    torch.save({"x": x, "mid": model.features(x, 50, "mid")["t50/mid"].detach()}, tmp_path / "ref.pt")
    code = textwrap.dedent(f"""
        import sys
        sys.modules["deepspeed"] = None
        sys.modules["ray"] = None
        import torch
        from pretrain.publish import load_backbone
        model, sched, spec = load_backbone({url!r})
        ref = torch.load({str(tmp_path / 'ref.pt')!r})
        with torch.no_grad():
            out = model.features(ref["x"], 50, "mid", scheduler=sched)["t50/mid"]
        assert torch.equal(out, ref["mid"])
        assert "deepspeed" not in [m.split(".")[0] for m, v in sys.modules.items() if v is not None]
        print("OK", spec.plane)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "OK cor" in res.stdout, res.stderr[-3000:]


@pytest.mark.integration
def test_publish_and_load_s3(manifest, s3_endpoint, tmp_path):
    import fsspec

    url = "s3://mskfm-test/backbones/cor-v1"
    model, _ = _publish(manifest, url)
    fs = fsspec.filesystem("s3")
    assert fs.exists("mskfm-test/backbones/cor-v1/scheduler/scheduler_config.json")
    assert "Final loss: 0.4321" in fs.cat("mskfm-test/backbones/cor-v1/README.md").decode()
    _check_loaded(model, url, cache_dir=tmp_path / "cache")
    direct = DiffusionBackbone.from_pretrained(url, cache_dir=tmp_path / "cache2").eval()
    x = torch.randn(1, 1, *SHAPE)
    with torch.no_grad():
        assert torch.equal(direct(x, torch.tensor([9])), model(x, torch.tensor([9])))
    with pytest.raises(FileExistsError, match="s3://mskfm-test/backbones/cor-v1"):
        _publish(manifest, url)
    _publish(manifest, url, overwrite=True)
    with pytest.raises(FileNotFoundError, match="no published backbone"):
        load_backbone("s3://mskfm-test/backbones/missing", cache_dir=tmp_path / "cache")


def test_real_synthetic_shards_to_published_card(tiny_shards, tmp_path):
    """The real path: tiny synthetic shards -> manifest spec -> preprocess -> features -> card."""
    from shards.manifest import load_manifest
    from shards.reader import iter_samples

    manifest = load_manifest(str(tiny_shards))
    spec = spec_from_manifest(manifest, "sag", SHAPE)
    sample = next(iter(iter_samples(str(tiny_shards), "train", fields=("sag",))))
    x = preprocess_volume(sample["sag"], spec)
    torch.manual_seed(0)
    model = DiffusionBackbone(**TINY, plane="sag", preprocessing=spec.to_dict()).eval()
    with torch.no_grad():
        feats = model.features(x, [0, 999], "mid")
    assert feats["t0/mid"].shape == (1, 8, 4, 8, 8) and all(torch.isfinite(f).all() for f in feats.values())
    assert not torch.allclose(feats["t0/mid"], feats["t999/mid"])
    publish_backbone(model, model.make_scheduler(), str(tmp_path / "knee-sag"), {}, manifest, {"steps": 0})
    card = (tmp_path / "knee-sag" / "README.md").read_text()
    stats = manifest["stats"]
    assert "Trained on synthetic studies" in card and "Shard manifest `tiny`" in card
    assert f"knee: {stats['joint']['knee']}" in card and f"shoulder: {stats['joint']['shoulder']}" in card
    assert f"{stats['planes']['sag']['intensity']['p99.5']}" in card
