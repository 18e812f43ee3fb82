"""downstream: tasks, metrics, heads, feature cache, bad input, end-to-end finetune on tiny data."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from downstream import cli
from downstream.data import check_manifest, load_studies
from downstream.features import FeatureCache, FeatureError, backbone_identity, cached_features
from downstream.finetune import run_finetune
from downstream.heads.ehr import EHRFusion, EHRHead, encode_tabular, fit_tabular
from downstream.heads.fusion import FeatureFusion, GatingNetwork, LabelLevelFusion
from downstream.heads.linear import PlaneHead
from downstream.heads.segmentation import SegDecoder
from downstream.metrics import (diagnosis_metrics, interval, segmentation_metrics, segmentation_scores,
                                select_thresholds)
from downstream.tasks import FeatureSpec, check_vocabulary, describe_tasks, load_task, task_registry
from downstream.train import fit, masked_bce
from pretrain.seg.loss import SparseDiceCELoss
from shards.config import ConfigError
from shards.manifest import load_manifest
from shards.synth.vocab import synth_declaration

PLANES = ("sag", "cor", "ax")
FAST = ["train.epochs=3", "baselines.epochs=1", "baselines.cnn_channels=[4,4,8,8]", "metrics.bootstrap=20",
        "features.timesteps=[10]", "features.blocks=[mid,up.1]"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def task_args(tiny_shards, tiny_hub, tmp_path, planes=PLANES) -> list[str]:
    return [f"shards={tiny_shards}", f"cache_dir={tmp_path / 'cache'}", f"out={tmp_path / 'runs'}",
            *[f"backbones.{p}={tiny_hub / f'knee-{p}'}" for p in planes], *FAST]


# ----- tasks ------------------------------------------------------------------------------------
def test_tasks_registry_and_cli(capsys):
    names = set(task_registry())
    assert {"knee-dx", "ankle-dx", "shoulder-dx", "knee-seg", "knee-dx-ehr"} <= names
    for name in names:
        load_task(name)
    assert len(load_task("knee-dx").labels) == 8
    assert len(describe_tasks()) == len(names)
    with pytest.raises(ConfigError, match="known: .*ankle-dx"):
        load_task("elbow-dx")
    # labels are checked against the shards' declaration (here the synthetic one) before any compute
    with pytest.raises(ConfigError, match="unknown knee labels \\['supraspinatus'\\]; known: acl, pcl"):
        check_vocabulary(load_task("knee-dx", ["labels=[acl,supraspinatus]"]), synth_declaration(), "task")
    assert cli.main(["tasks"]) == 0
    assert "knee-seg" in capsys.readouterr().out
    assert cli.main(["finetune", "--task", "elbow-dx"]) == 2
    assert "known:" in capsys.readouterr().err


# ----- metrics ----------------------------------------------------------------------------------
def test_diagnosis_metrics_hand_checked():
    # patient p2 has two studies (mean score 0.4); p5's label is unknown and must be ignored.
    frame = pd.DataFrame({"patient": ["p1", "p2", "p2", "p3", "p4", "p5", "p6", "p7", "p8"],
                          "acl": [0, 0, 0, 1, 1, np.nan, 0, 1, 1],
                          "p_acl": [0.1, 0.3, 0.5, 0.45, 0.8, 0.99, 0.6, 0.7, 0.9]})
    thresholds = select_thresholds(frame, ["acl"])                # as if this were the selection split
    assert thresholds["acl"] == pytest.approx(0.7)                 # J = 0.75 at 0.7 vs 0.67 at 0.45
    m = diagnosis_metrics(frame, ["acl"], n_boot=200, seed=0, thresholds=thresholds)
    acl = m["per_label"]["acl"]
    assert acl["n"] == 7 and acl["n_pos"] == 4 and m["n_patients"] == 8
    assert acl["auroc"] == pytest.approx(11 / 12)                 # 0.45 beats 2 of 3 negatives
    assert acl["ap"] == pytest.approx((1 + 1 + 1 + 4 / 5) / 4)
    assert acl["threshold"] == pytest.approx(0.7)
    assert (acl["sensitivity"], acl["specificity"]) == (0.75, 1.0)
    # another split is scored at the given threshold, not at its own Youden point (0.45 here: 1.0, 1.0)
    other = pd.DataFrame({"patient": ["q1", "q2", "q3", "q4"], "acl": [0, 0, 1, 1], "p_acl": [0.1, 0.3, 0.45, 0.8]})
    scored = diagnosis_metrics(other, ["acl"], n_boot=0, thresholds=thresholds)["per_label"]["acl"]
    assert (scored["sensitivity"], scored["specificity"], scored["threshold"]) == (0.5, 1.0, pytest.approx(0.7))
    blind = diagnosis_metrics(other, ["acl"], n_boot=0)["per_label"]["acl"]
    assert np.isnan(blind["sensitivity"]) and blind["auroc"] == 1.0  # no threshold given: none picked here
    lo, hi = acl["ci"]["auroc"]
    assert 0 <= lo <= acl["auroc"] <= hi <= 1
    assert m["macro"]["auroc"] == pytest.approx(11 / 12)


def test_segmentation_metrics_hand_checked():
    truth = torch.zeros(1, 4, 8, 8, dtype=torch.long)
    truth[0, 1:3, 2:6, 2:6] = 1                                    # 2x4x4 = 32 voxels
    pred = torch.zeros_like(truth)
    pred[0, 1:3, 3:7, 2:6] = 1                                     # shifted one row: 24 overlap
    s = segmentation_scores(pred, truth, 2, spacing=(3.0, 2.0, 1.0))
    assert s["dice"][0, 0] == pytest.approx(2 * 24 / 64)
    assert s["iou"][0, 0] == pytest.approx(24 / 40)
    assert s["hd95"][0, 0] == pytest.approx(2.0)                   # one row of 2 mm
    normal = interval(np.array([0.70, 0.72, 0.74, 0.76, 0.78, 0.71, 0.73, 0.75]))
    assert normal["method"] == "normal" and normal["ci"][0] < 0.74 < normal["ci"][1]
    skewed = interval(np.array([0.9] * 9 + [0.0]))
    assert skewed["method"] == "bootstrap" and skewed["ci"][0] <= skewed["mean"] <= skewed["ci"][1]
    out = segmentation_metrics({k: np.vstack([v, v]) for k, v in s.items()}, ["femur"], n_boot=50)
    assert out["per_structure"]["femur"]["dice"]["mean"] == pytest.approx(0.75)


# ----- heads ------------------------------------------------------------------------------------
def _maps(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {p: [torch.randn(n, 4, 2, 4, 4, generator=g), torch.randn(n, 8, 1, 2, 2, generator=g)] for p in PLANES}


def _labels_from(maps, n_labels=3):
    y = (maps["sag"][0].mean(dim=(2, 3, 4))[:, :n_labels] > 0).float()
    y[0, 0] = float("nan")                                         # an unknown label
    return y


def _trains(model, inputs, y, epochs=40):
    hist = fit(model, lambda idx: ({k: [t[idx] for t in v] if isinstance(v, list) else
                                    {a: b[idx] for a, b in v.items()} for k, v in inputs.items()}, y[idx]),
               np.arange(len(y)), masked_bce, epochs=epochs, lr=1e-2, batch_size=8, seed=0)
    assert hist[-1] < hist[0], hist
    return model


@pytest.mark.parametrize("kind,pooling", [("linear", "avg"), ("mlp", "attention"), ("linear", "global_local")])
def test_plane_head_trains(kind, pooling):
    maps = _maps()
    y = _labels_from(maps)
    model = _trains(PlaneHead("sag", [4, 8], 3, kind, pooling), maps, y)
    assert model({"sag": [t[:5] for t in maps["sag"]]}).shape == (5, 3)


@pytest.mark.parametrize("kind", ["concat", "projected_sum", "cross_attention", "label_level"])
def test_fusion_heads(kind):
    maps = _maps()
    y = _labels_from(maps)
    channels = {p: [4, 8] for p in PLANES}
    model = (LabelLevelFusion(channels, 3) if kind == "label_level" else FeatureFusion(kind, channels, 3))
    _trains(model, maps, y)
    assert model(maps).shape == (24, 3)
    if kind == "label_level":
        assert torch.allclose(model.fusion_weights().sum(dim=0), torch.ones(3))


def test_gating_weights_sum_to_one_and_train():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(32, 3, 2, generator=g)
    y = (probs[:, 1] > 0.5).float()                                # plane 1 is the informative one
    gate = GatingNetwork(3, 2, 16)
    hist = fit(gate, lambda idx: (probs[idx], y[idx]), np.arange(32), masked_bce, epochs=60, lr=1e-2, seed=0)
    assert hist[-1] < hist[0]
    w = gate.weights(probs)
    assert w.shape == (32, 3, 2) and torch.allclose(w.sum(dim=1), torch.ones(32, 2), atol=1e-6)
    assert (w[:, 1].mean() > w[:, 0].mean()) and (w[:, 1].mean() > w[:, 2].mean())


def test_ehr_fusion_trains_and_weights_sum_to_one():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"numeric": ["age"], "categorical": ["sex"], "event": "injury_event"})
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"ehr.age": rng.normal(50, 10, 24), "ehr.sex": rng.choice(["F", "M"], 24),
                          "ehr.injury_event": rng.choice(["sport", "fall", "none"], 24)})
    frame.loc[0, "ehr.age"] = np.nan
    tab = fit_tabular(frame, cfg)
    ehr = encode_tabular(frame, tab)
    assert ehr["num"].shape == (24, 1) and ehr["cat"].shape == (24, 2) and torch.isfinite(ehr["num"]).all()
    maps = _maps()
    y = torch.from_numpy((frame["ehr.sex"] == "M").to_numpy(np.float32))[:, None].repeat(1, 3)
    model = EHRFusion(PlaneHead("sag", [4, 8], 3), EHRHead(tab, 3), 3)
    _trains(model, {"sag": maps["sag"], "ehr": ehr}, y)
    assert torch.allclose(model.fusion_weights().sum(dim=0), torch.ones(3))


def test_masked_bce_ignores_unknown_labels():
    logits = torch.zeros(2, 2, requires_grad=True)
    target = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    masked_bce(logits, target).backward()
    assert logits.grad[0, 1] == 0 and logits.grad[0, 0] != 0


def test_segmentation_decoder_trains_and_ignores_unlabelled():
    g = torch.Generator().manual_seed(0)
    maps = {"sag": [torch.randn(4, 8, 2, 8, 8, generator=g)]}
    target = (maps["sag"][0][:, 0].repeat_interleave(2, 1).repeat_interleave(2, 2).repeat_interleave(2, 3) > 0).long()
    target[:, :, :4] = 255                                         # sparse: top rows unlabelled
    loss = SparseDiceCELoss(255)
    model = SegDecoder("sag", [8], 2, (4, 16, 16), hidden=8)
    hist = fit(model, lambda idx: ({"sag": [maps["sag"][0][idx]]}, target[idx]), np.arange(4), loss,
               epochs=15, lr=1e-2, batch_size=4, seed=0)
    assert hist[-1] < hist[0]
    logits = model(maps)
    assert logits.shape == (4, 2, 4, 16, 16)
    changed = logits.detach().clone()
    changed[:, :, :, :4] = torch.randn_like(changed[:, :, :, :4]) * 10
    assert loss(changed, target).item() == pytest.approx(loss(logits.detach(), target).item(), rel=1e-5)


# ----- feature cache ----------------------------------------------------------------------------
def _tiny_backbone(seed=0):
    from pretrain.models.diffusion import DiffusionBackbone

    torch.manual_seed(seed)
    return DiffusionBackbone(channels=(4, 8), attention_levels=(False, False), num_res_blocks=1,
                             num_head_channels=8, norm_num_groups=4, schedule={"num_train_timesteps": 100}).eval()


def test_feature_cache_reused_and_invalidated(tmp_path):
    cache = FeatureCache(tmp_path)
    vols = np.random.default_rng(0).normal(size=(3, 1, 4, 16, 16)).astype(np.float32)
    keys = ["s-a", "s-b", "s-c"]
    model = _tiny_backbone()
    spec = {"shape": [4, 16, 16], "low": 0.0, "high": 1.0}
    base = dict(spec=spec, feat=FeatureSpec(timesteps=[10], blocks=["mid"], batch_size=2), manifest_id="m1",
                joint="knee", plane="sag")

    def get(model=model, **kw):
        args = base | kw
        return cached_features(cache, model, backbone_identity(model), vols, args["spec"], args["feat"],
                               args["manifest_id"], args["joint"], args["plane"], keys)

    first = get()
    assert cache.misses == 1 and isinstance(first["t10/mid"], np.memmap)
    again = get(model=_tiny_backbone())                            # same weights, reloaded
    assert cache.hits == 1 and np.array_equal(first["t10/mid"], again["t10/mid"])
    variants = [dict(feat=FeatureSpec(timesteps=[20], blocks=["mid"])), dict(feat=FeatureSpec(timesteps=[10], blocks=["up.1"])),
                dict(feat=FeatureSpec(timesteps=[10], blocks=["mid"], noise_draws=2)),
                dict(feat=FeatureSpec(timesteps=[10], blocks=["mid"], seed=1)), dict(manifest_id="m2"),
                dict(spec=spec | {"high": 2.0}), dict(model=_tiny_backbone(seed=1)), dict(joint="ankle"),
                dict(plane="cor")]
    for i, kw in enumerate(variants, start=2):
        get(**kw)
        assert cache.misses == i, f"variant {kw} should miss the cache"
    assert cache.hits == 1
    subset = cached_features(cache, model, backbone_identity(model), vols[:2], spec, base["feat"], "m1", "knee",
                             "sag", keys[:2])                      # other studies (e.g. other planes required)
    assert cache.misses == len(variants) + 2 and np.allclose(subset["t10/mid"], first["t10/mid"][:2], atol=1e-5)
    assert not list(tmp_path.glob(".*tmp*"))                        # no temporary folder left


def _compute_once(root, counter):
    cache = FeatureCache(root)

    def compute(folder, keys):
        with open(counter, "a") as fh:
            fh.write("x")
        time.sleep(0.5)
        arr = np.lib.format.open_memmap(folder / "0.npy", mode="w+", dtype=np.float32, shape=(len(keys), 2))
        arr[:] = 1
        arr.flush()
        (folder / "names.json").write_text(json.dumps(["f"]))

    out = cache.get_or_create({"kind": "test"}, ["a", "b"], compute)
    assert float(out["f"].sum()) == 4


def test_feature_cache_concurrent_writers_compute_once(tmp_path):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_compute_once, args=(tmp_path / "c", tmp_path / "count")) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert (tmp_path / "count").read_text() == "x"


def test_nan_features_stop_with_study_key(tmp_path):
    vols = np.zeros((3, 1, 4, 16, 16), np.float32)
    vols[1, 0, 0, 0, 0] = np.nan                                   # only the second study goes bad
    with pytest.raises(FeatureError, match="study s-second"):
        cached_features(FeatureCache(tmp_path), _tiny_backbone(), "m0", vols, {}, FeatureSpec(timesteps=[10], blocks=["mid"]),
                        "m", "knee", "sag", ["s-first", "s-second", "s-third"])
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]       # nothing half-written in the cache


# ----- bad input --------------------------------------------------------------------------------
def test_bad_input_named_before_compute(tiny_shards, tiny_hub, tmp_path):
    args = task_args(tiny_shards, tiny_hub, tmp_path)
    with pytest.raises(ConfigError, match=r"no published backbone at '.*knee-nope'.*existing there: knee-ax, knee-cor, knee-sag"):
        run_finetune("ankle-dx", args + [f"backbones.cor={tiny_hub / 'knee-nope'}"])
    assert not (tmp_path / "cache").exists()                       # failed before any compute
    manifest = load_manifest(str(tiny_shards))
    task = load_task("knee-dx", args)
    no_ax = json.loads(json.dumps(manifest))
    del no_ax["stats"]["planes"]["ax"]
    with pytest.raises(ConfigError, match=r"plane\(s\) \['ax'\] absent .*planes present: cor, sag"):
        check_manifest(task, no_ax)
    no_acl = json.loads(json.dumps(manifest))
    del no_acl["stats"]["labels"]["knee"]["acl"]
    with pytest.raises(ConfigError, match=r"label\(s\) \['acl'\] are not in the manifest .*labels present: .*pcl"):
        check_manifest(task, no_acl)
    with pytest.raises(ConfigError, match="features.blocks \\['up.7'\\] do not exist"):
        run_finetune("ankle-dx", args + ["features.blocks=[up.7]"])


def test_studies_of_unread_splits_are_not_loaded(tiny_shards, tiny_hub, tmp_path):
    """Only the splits a task reads get volumes and features: a large unlabelled ``pretrain`` pool
    (the benchmark's) would otherwise cost feature extraction no head ever uses."""
    args = task_args(tiny_shards, tiny_hub, tmp_path)
    assert set(load_studies(load_task("knee-dx", args))["split"]) == {"train", "val", "test"}
    no_selection = load_studies(load_task("knee-dx", [*args, 'train.select_split=""']))
    assert set(no_selection["split"]) == {"train", "test"}
    on_val = load_studies(load_task("knee-dx", [*args, 'train.select_split=""', "train.eval_split=val"]))
    assert set(on_val["split"]) == {"train", "val"}
    with pytest.raises(ConfigError, match=r"split\(s\) \['pretrain'\] have no knee studies; splits: test, train, val"):
        load_studies(load_task("knee-dx", [*args, "train.eval_split=pretrain"]))


def test_pixel_baselines_train_at_least_min_steps(tiny_shards, tiny_hub, tmp_path):
    """``baselines.min_steps`` raises the pixel models' epochs on small training sets (a label fraction
    would otherwise also cut their gradient steps); ``epochs`` stays the floor."""
    from downstream.tasks import BaselineSpec

    spec = BaselineSpec(epochs=8, min_steps=232)
    assert spec.epochs_for(452, 16) == 8          # 29 steps per epoch: 8 epochs already give 232
    assert spec.epochs_for(44, 16) == 78          # 3 steps per epoch
    assert spec.epochs_for(7, 16) == 232 and BaselineSpec(epochs=8).epochs_for(7, 16) == 8
    args = [*task_args(tiny_shards, tiny_hub, tmp_path), "baselines.names=[scratch_cnn]", "probe.enabled=false",
            "train.patience=0"]
    res = run_finetune("ankle-dx", [*args, "baselines.min_steps=5"], run_dir=tmp_path / "run")
    steps_per_epoch = -(-res["n_train"] // 16)
    expected = max(1, -(-5 // steps_per_epoch))
    assert expected > 1
    assert res["selection"]["scratch_cnn"]["candidates"][0]["epochs_run"] == expected
    with pytest.raises(ConfigError, match="baselines.min_steps >= 0"):
        load_task("ankle-dx", [*args, "baselines.min_steps=-1"])


# ----- end to end -------------------------------------------------------------------------------
def test_finetune_ankle_dx_end_to_end(tiny_shards, tiny_hub, tmp_path, capsys):
    args = task_args(tiny_shards, tiny_hub, tmp_path)
    assert cli.main(["finetune", "--task", "ankle-dx", "--run-dir", str(tmp_path / "run1"), *args]) == 0
    table = capsys.readouterr().out
    for name in ("diffusion", "random_backbone", "scratch_cnn", "mrnet_2d"):
        assert name in table
    run = tmp_path / "run1"
    for f in ("config.yaml", "metrics.json", "predictions.csv", "head.safetensors", "plots/roc.png",
              "plots/fusion_weights_diffusion.png"):
        assert (run / f).is_file(), f
    metrics = json.loads((run / "metrics.json").read_text())
    assert all(c["hits"] == 0 for c in metrics["cache"].values())
    pred = pd.read_csv(run / "predictions.csv")
    assert len(pred) == metrics["metrics"]["diffusion"]["n_patients"]
    labels = load_task("ankle-dx").labels
    assert {f"diffusion/{name}" for name in labels} <= set(pred.columns)
    assert pred[[f"diffusion/{n}" for n in labels]].apply(lambda c: c.between(0, 1)).all().all()
    weights = pd.read_csv(run / "fusion_weights_diffusion.csv")
    sums = weights.groupby(["patient", "label"])["weight"].sum()
    assert np.allclose(sums, 1.0, atol=1e-5) and set(weights["plane"]) == set(PLANES)

    _predict_reproduces(run, tiny_shards, tiny_hub, tmp_path / "pred", single_study_patients=True)  # experts

    second = run_finetune("ankle-dx", args, run_dir=tmp_path / "run2")
    assert all(c["hits"] == c["lookups"] for c in second["cache"].values())
    first_probs, second_probs = pred, pd.read_csv(tmp_path / "run2" / "predictions.csv")
    assert np.allclose(first_probs.filter(like="diffusion/"), second_probs.filter(like="diffusion/"), atol=1e-5)


def test_finetune_segmentation(tiny_shards, tiny_hub, tmp_path):
    res = run_finetune("knee-seg", task_args(tiny_shards, tiny_hub, tmp_path, planes=("sag",))
                       + ["features.blocks=[mid,up.1]", "train.epochs=4"], run_dir=tmp_path / "seg")
    assert set(res["metrics"]) == {"diffusion", "random_backbone", "scratch_cnn"}
    dice = res["metrics"]["diffusion"]["mean"]["dice"]
    assert 0 <= dice["mean"] <= 1 and dice["n"] == res["n_eval"]
    assert res["history"]["diffusion"][-1] < res["history"]["diffusion"][0]
    assert (tmp_path / "seg" / "plots" / "segmentation_overlays.png").is_file()
    assert "Dice" in res["table"]


def test_finetune_ehr_and_backbone_blocks(tiny_shards, tiny_hub, tmp_path):
    args = task_args(tiny_shards, tiny_hub, tmp_path, planes=("sag",)) + ["planes=[sag]", "baselines.names=[]"]
    res = run_finetune("knee-dx-ehr", args, run_dir=tmp_path / "ehr")
    assert set(res["metrics"]) == {"diffusion", "probe", "ehr_only", "diffusion+ehr"}
    w = pd.read_csv(tmp_path / "ehr" / "fusion_weights_diffusion_ehr.csv")
    assert np.allclose(w.groupby("label")["weight"].sum(), 1.0)
    tuned = run_finetune("knee-dx", args + ["head.finetune_blocks=[mid]", "train.epochs=2", "train.lr=0.003"],
                         run_dir=tmp_path / "ft")  # fine-tuning: a lower rate than the frozen head's 0.02
    assert tuned["history"]["diffusion"][-1] < tuned["history"]["diffusion"][0]
    _predict_reproduces(tmp_path / "ft", tiny_shards, tiny_hub, tmp_path / "pred")  # tuned backbone copies


def _predict_reproduces(run: Path, shards: Path, hub: Path, out: Path, single_study_patients: bool = False) -> None:
    """The run's task model, applied by ``predict``, gives the run's own test-split probabilities
    (plane experts gate per patient in finetune, per study in predict: compared where equal)."""
    from downstream.predict import load_predict_config, run_predict

    pred = run_predict(str(run), [str(shards)], out, load_predict_config(None, [f"backbone_dir={hub}", "split=test"]))
    ref = pd.read_csv(run / "study_predictions.csv")
    if single_study_patients:
        ref = ref[ref.groupby("patient")["key"].transform("count") == 1]
    merged = ref.merge(pred["predictions"], on="key")
    assert len(merged) == len(ref) > 0
    for col in [c for c in ref.columns if c.startswith("diffusion/")]:
        assert np.abs(merged[col] - merged["prob/" + col.split("/", 1)[1]]).max() < 1e-6, col
