"""3D segmentation (issue 16): patches, sliding windows, encoder initialisation, scores, boxes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.seg.inference import predict_logits
from pretrain.seg.network import SegNetwork, backbone_unet_kwargs, load_encoder
from pretrain.seg.patches import centre_on_foreground, sample_patches
from shards.labelmaps import class_lut, to_classes, undeclared_values, union_structures


def _cube_volume():
    image = torch.randn(1, 16, 32, 32)
    label = torch.zeros(1, 16, 32, 32, dtype=torch.long)
    label[0, 6:10, 14:18, 14:18] = 3  # 64 of 16384 voxels (0.4%) are foreground
    return image, label


@pytest.mark.parametrize("pos_fraction", [0.0, 0.33, 1.0])
def test_patch_sampling_oversamples_foreground_at_the_configured_rate(pos_fraction):
    image, label = _cube_volume()
    _, labels = sample_patches(image, label, [8, 8, 8], pos_fraction, n=400, seed=7)
    rate = centre_on_foreground(labels).mean()
    background_share = (label > 0).float().mean().item()
    expected = pos_fraction + (1 - pos_fraction) * background_share
    assert abs(rate - expected) < 0.08, (rate, expected)
    assert labels.shape == (400, 1, 8, 8, 8)


def test_patch_sampling_is_seeded_and_pads_small_volumes():
    image, label = _cube_volume()
    a = sample_patches(image, label, [8, 8, 8], 0.5, n=4, seed=3)
    b = sample_patches(image, label, [8, 8, 8], 0.5, n=4, seed=3)
    c = sample_patches(image, label, [8, 8, 8], 0.5, n=4, seed=4)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    small_img, small_lab = torch.ones(1, 4, 6, 6), torch.ones(1, 4, 6, 6, dtype=torch.long)
    x, y = sample_patches(small_img, small_lab, [8, 8, 8], 1.0, n=2, seed=0)
    assert x.shape == (2, 1, 8, 8, 8) and set(y.unique().tolist()) == {1, 255}  # padding is unlabelled


def test_sliding_window_equals_full_volume_inference():
    torch.manual_seed(0)
    pointwise = torch.nn.Conv3d(1, 3, 1).eval()  # local model: overlapping Gaussian-weighted windows blend exactly
    x = torch.randn(1, 1, 12, 20, 20)
    torch.testing.assert_close(predict_logits(pointwise, x, [8, 8, 8], overlap=0.5), pointwise(x), atol=1e-5, rtol=1e-5)
    net = SegNetwork(arch="dynunet", n_classes=4, filters=[4, 8, 8], patch=[8, 16, 16]).eval()
    vol = torch.randn(1, 1, 8, 16, 16)  # one window covers the volume
    with torch.no_grad():
        torch.testing.assert_close(predict_logits(net, vol, [8, 16, 16]), net(vol), atol=1e-5, rtol=1e-5)
    flipped = predict_logits(net, vol, [8, 16, 16], mirror_axes=[2])
    assert not torch.allclose(flipped, net(vol).detach())  # mirroring is opt-in and changes the result


def test_encoder_initialised_from_a_published_backbone(tmp_path):
    from pretrain.models.diffusion import DiffusionBackbone

    torch.manual_seed(5)
    backbone = DiffusionBackbone(channels=(4, 8, 8), attention_levels=(False, False, False), num_res_blocks=1,
                                 num_head_channels=8, norm_num_groups=4, schedule={"num_train_timesteps": 100})
    backbone.save_pretrained(tmp_path / "bb", safe_serialization=True)
    kwargs = backbone_unet_kwargs(str(tmp_path / "bb"))
    torch.manual_seed(6)
    seg = SegNetwork(arch="diffusion_unet", n_classes=5, unet=kwargs, deep_supervision=1)
    loaded = load_encoder(seg, str(tmp_path / "bb"))
    theirs = backbone.unet.state_dict()
    ours = seg.net.state_dict()
    assert any(k.startswith("down_blocks.1.") for k in loaded) and any(k.startswith("middle_block.") for k in loaded)
    for k in loaded:
        assert torch.equal(ours[k], theirs[k]), k
    decoder = [k for k in ours if k.startswith("up_blocks.") and ours[k].shape == theirs[k].shape]
    assert decoder and not any(k in loaded for k in decoder)
    assert not all(torch.equal(ours[k], theirs[k]) for k in decoder)  # the decoder starts new
    seg.train()
    outs = seg(torch.randn(2, 1, 8, 16, 16))
    assert len(outs) == 2 and all(o.shape == (2, 5, 8, 16, 16) for o in outs)  # deep supervision at 1/2
    with pytest.raises(ValueError, match="does not fit"):
        load_encoder(SegNetwork(arch="diffusion_unet", n_classes=5, filters=[8, 16, 16]), str(tmp_path / "bb"))


def test_class_vocabulary_over_anatomies_and_undeclared_values():
    tables = {"knee": ["background", "femur", "tibia"], "hip": ["background", "femur", "acetabulum"]}
    classes = union_structures(tables)
    assert classes == ["femur", "tibia", "acetabulum"]
    seg = np.array([[[0, 1, 2, 7]]], np.uint8)
    assert to_classes(seg, tables["hip"], classes).tolist() == [[[0, 1, 3, 255]]]
    assert undeclared_values(seg, tables["hip"]) == [7]
    assert class_lut(tables["knee"], ["tibia"])[1] == 0  # a declared structure outside the classes: background


def test_structure_tables_come_from_the_manifest_declaration_and_gaps_are_undeclared():
    from shards.dataset import AnatomySpec, DatasetDeclaration
    from shards.labelmaps import structure_tables

    decl = DatasetDeclaration("site", anatomies={"hip": AnatomySpec(structures={"femur": 1, "labrum": 3})})
    manifest = {"dataset": decl.to_dict()}
    tables = structure_tables(manifest, ["hip"])
    assert tables == {"hip": ["background", "femur", None, "labrum"]}
    seg = np.array([[[0, 1, 2, 3, 5]]], np.uint8)
    assert undeclared_values(seg, tables["hip"]) == [2, 5]  # a gap in the numbering is not a structure
    assert to_classes(seg, tables["hip"], union_structures(tables)).tolist() == [[[0, 1, 255, 2, 255]]]
    with pytest.raises(ValueError, match="knee"):
        structure_tables(manifest, ["knee"])  # the declaration, not the generator's tables, decides
    assert structure_tables({}, ["knee"])["knee"][1] == "femur"  # v1 manifests: the synthetic vocabulary


def test_more_regions_are_opt_in_and_their_label_maps_agree_across_planes():
    from shards.synth.vocab import STRUCTURES
    from shards.synth import SynthConfig, generate_study, iter_study_refs

    assert SynthConfig().joints == ["knee", "ankle", "shoulder"]  # the default build is unchanged
    distinct = {n for names in STRUCTURES.values() for n in names if n != "background"}
    assert len(STRUCTURES) >= 6 and len(distinct) >= 40
    cfg = SynthConfig(seed=3, n_patients=9, joints=["hip", "elbow", "wrist"], joint_weights=[1, 1, 1],
                      plane_missing_rate=0.0, shape={p: [16, 48, 48] for p in ("sag", "cor", "ax")})
    done = set()
    for plan, visit, key in iter_study_refs(cfg):
        if plan.joint in done:
            continue
        done.add(plan.joint)
        sample, _ = generate_study(cfg, plan, visit, key)
        names = STRUCTURES[plan.joint]
        assert sample["meta"]["structures"] == list(names)
        checked = 0
        voxel_mm3 = {p: float(np.prod(sample["meta"]["planes"][p]["spacing"])) for p in ("sag", "cor", "ax")}
        for value, name in enumerate(names):
            if name in ("background", "fat", "muscle", "fluid") or name.endswith(("_ligament", "_nerve", "cartilage")):
                continue
            masks = [sample[f"{p}.seg"] == value for p in ("sag", "cor", "ax")]
            assert all(m.any() for m in masks), (plan.joint, name)
            if any(m[[0, -1]].any() or m[:, [0, -1]].any() or m[:, :, [0, -1]].any() for m in masks):
                continue  # cut by a field of view: planes cover different extents
            mm3 = [float(m.sum()) * voxel_mm3[p] for m, p in zip(masks, ("sag", "cor", "ax"))]
            if min(mm3) < 500:
                continue  # thin structures: partial volume across thick slices differs by plane
            checked += 1
            assert max(mm3) / min(mm3) < 1.6, (plan.joint, name, mm3)  # one anatomy, seen by every plane
        assert checked >= 3, plan.joint
    assert done == {"hip", "elbow", "wrist"}


def test_box_jitter_is_reproducible_per_study_and_structure_and_clipped_boxes_are_named():
    from downstream.seg3d.boxes import prompt_boxes

    truth = np.zeros((8, 20, 20), np.int64)
    truth[2:6, 5:12, 6:10] = 1
    truth[0:8, 0:20, 15:20] = 2  # touches the volume's faces: jitter pushes its box out, so it is clipped
    a, problems = prompt_boxes(truth, ["bone", "skin", "absent"], "study-1", jitter=0.2, seed=0)
    b, _ = prompt_boxes(truth, ["bone", "skin", "absent"], "study-1", jitter=0.2, seed=0)
    assert a == b and [x.structure for x in a] == ["bone", "skin"]  # no box for an absent structure
    only_bone, _ = prompt_boxes(np.where(truth == 1, 1, 0), ["bone"], "study-1", jitter=0.2, seed=0)
    assert only_bone[0] == a[0]  # a structure's box does not depend on the others
    assert prompt_boxes(truth, ["bone", "skin"], "study-1", jitter=0.2, seed=1)[0] != a
    assert prompt_boxes(truth, ["bone", "skin"], "study-2", jitter=0.2, seed=0)[0] != a
    assert a[0].lo != (2, 5, 6) or a[0].hi != (6, 12, 10)  # jittered, not the tight box
    assert all(0 <= lo < hi <= n for x in a for lo, hi, n in zip(x.lo, x.hi, truth.shape))
    assert a[1].clipped and {"study": "study-1", "structure": "skin", "problem": "box clipped to the volume"} in problems
    tight, _ = prompt_boxes(truth, ["bone"], "study-1", jitter=0.0, seed=0)
    assert (tight[0].lo, tight[0].hi) == ((2, 5, 6), (6, 12, 10))


def _case(joint, dice, present, predicted, site="A"):
    return {"joint": joint, "site": site, "dice": np.array(dice, float), "hd95": np.array(dice, float) * 10,
            "present": np.array(present), "predicted": np.array(predicted)}


def test_internal_external_report_excludes_and_counts_absent_structures_and_names_undeclared_values():
    from downstream.seg3d.evaluate import SegEvalConfig, TestSetConfig, check_hold_out
    from downstream.seg3d.report import render_report
    from downstream.seg3d.scores import summarise
    from shards.config import UserError

    classes = ["femur", "acl", "talus"]
    regions = {"knee": ["femur", "acl"], "ankle": ["talus"]}
    internal = [_case("knee", [0.9, 0.5, np.nan], [True, True, False], [True, True, False]),
                _case("knee", [0.7, np.nan, np.nan], [True, False, False], [True, True, False]),  # acl absent, predicted
                _case("ankle", [np.nan, np.nan, 0.8], [False, False, True], [False, False, True])]
    external = [_case("knee", [0.6, 0.0, np.nan], [True, True, False], [True, False, False], site="D")]
    sets = {"internal": summarise(internal, classes, regions, n_boot=50),
            "external": summarise(external, classes, regions, n_boot=50)}
    acl = sets["internal"]["per_structure"]["acl"]
    assert acl["dice"]["mean"] == 0.5 and acl["dice"]["n"] == 1  # the absent case is neither 0 nor 1
    assert (acl["n_present"], acl["n_absent"], acl["n_false_positive"]) == (1, 1, 1)
    assert sets["internal"]["per_structure"]["talus"]["n_absent"] == 0  # knees do not hold a talus
    assert sets["internal"]["per_region"]["knee"]["dice"]["mean"] == pytest.approx((0.7 + 0.7) / 2)
    assert sets["external"]["per_structure"]["acl"]["n_missed"] == 1
    d = sets["internal"]["per_structure"]["femur"]["dice"]
    assert d["ci"][0] <= d["mean"] <= d["ci"][1] and d["n"] == 2
    report = render_report({"model": "m", "sets": sets, "external": ["external"], "hold_out": {"site": ["D"]},
                            "undeclared": [{"set": "internal", "study": "s-1", "values": [42]}]})
    assert "| femur | 0.800 [" in report and "(n=1) |" in report
    assert "s-1: values [42]" in report and "| internal | acl | 1 | 1 | 1 | 0 |" in report
    cfg = SegEvalConfig(model="m", sets={"internal": TestSetConfig("x"), "external": TestSetConfig("y")},
                        hold_out={"site": ["D"]})
    check_hold_out(cfg, "external", external)
    with pytest.raises(UserError, match="holds site"):
        check_hold_out(cfg, "internal", external)
    with pytest.raises(UserError, match="holds site"):
        check_hold_out(cfg, "external", internal)


REGIONS = ["knee", "ankle", "shoulder", "hip", "elbow", "wrist"]


@pytest.fixture(scope="module")
def region_shards(tmp_path_factory):
    """Six regions, sagittal 8x32x32: sites A-C (training, internal test) and site D (external)."""
    from shards.build import BuildConfig, build_shards
    from shards.config import load_config

    root = tmp_path_factory.mktemp("regions")
    common = ["synth.planes=[sag]", "synth.kspace.enabled=false", f"synth.joints=[{','.join(REGIONS)}]",
              f"synth.joint_weights=[{','.join(['1'] * len(REGIONS))}]", "synth.shape.sag=[8,32,32]",
              "synth.plane_missing_rate=0.0"]
    build_shards(load_config(BuildConfig, "configs/shards/tiny.yaml", [
        f"out={root / 'internal'}", "synth.n_patients=18", "synth.sites=[A,B,C]", "splits.train=0.6",
        "splits.val=0.1", "splits.test=0.3", *common]), progress=False)
    build_shards(load_config(BuildConfig, "configs/shards/tiny.yaml", [
        f"out={root / 'external'}", "synth.seed=1", "synth.n_patients=6", "synth.sites=[D]", "splits.train=0.0",
        "splits.val=0.0", "splits.test=1.0", *common]), progress=False)
    return root


def test_labelled_subsets_are_nested_seeded_and_cover_every_region(region_shards, tmp_path):
    """A segmentation label-efficiency study's subsets: every cap from one study per region up keeps a
    study of each region of the training split (a random draw of that many would not), smaller caps are
    nested in larger ones, the seed decides; a cap below one per region is refused before anything is
    written."""
    from dataclasses import replace

    from pretrain.config import PretrainConfig
    from pretrain.objectives import build_objective, study_subset
    from shards.config import ConfigError, load_config
    from shards.manifest import load_manifest
    from shards.reader import study_index

    internal = region_shards / "internal"
    manifest, index = load_manifest(str(internal)), study_index(str(internal), "train", "sag")
    regions = sorted(set(index.values()))  # the tiny split has no study of some region
    assert len(regions) >= 4

    base = load_config(PretrainConfig, "configs/pretrain/seg3d-tiny.yaml", [
        f"data.source={internal}", f"run_root={tmp_path / 'runs'}", f"storage_path={tmp_path / 'ckpt'}"])

    def config(cap, seed):  # joints replaced, not overridden: an override would merge into the file's joints
        return replace(base, joints=dict.fromkeys(regions, 1.0),
                       data=replace(base.data, max_studies=cap, subset_seed=seed))

    def keys(cap, seed):
        return study_subset(config(cap, seed), "sag", dict.fromkeys(regions, 1.0))

    caps = range(len(regions), len(index) + 1)
    for seed in range(3):
        subsets = [keys(cap, seed) for cap in caps]
        for small, large in zip(subsets, subsets[1:]):
            assert small == large[:len(small)]
        assert all(len(s) == cap and {index[k] for k in s} == set(regions) for s, cap in zip(subsets, caps))
        assert keys(len(regions) + 1, seed) == subsets[1]  # seeded: the same draw again
    assert keys(len(regions) + 1, 0) != keys(len(regions) + 1, 1)
    objective = build_objective(config(len(regions), 0), "sag", manifest)  # what the segmentation run trains on
    assert objective.keys == keys(len(regions), 0) and objective.data_summary()["n_studies"] == len(regions)
    n = len(regions)
    with pytest.raises(ConfigError, match=rf"key 'data.max_studies': {n - 1} studies cannot cover the {n} joints"):
        build_objective(config(n - 1, 0), "sag", manifest)
    assert not (tmp_path / "runs").exists()


@pytest.mark.integration
def test_many_structure_seg3d_end_to_end(region_shards, tmp_path):
    """Six regions, one model: train on the engine (resumable), publish, score internal vs external on
    native grids, export to nnU-Net's layout, run the box-prompt study against the prompt-free model."""
    import json

    from downstream.seg3d.evaluate import run_seg_eval
    from downstream.seg3d.prompted import run_prompt_study
    from pretrain.config import PretrainConfig
    from pretrain.models.diffusion import DiffusionBackbone
    from pretrain.objectives import build_objective
    from pretrain.preprocess import spec_from_manifest
    from pretrain.publish import publish_backbone
    from pretrain.run import publish_run, train
    from shards.config import load_config
    from shards.manifest import load_manifest
    from shards.nnunet import export_nnunet

    internal, external = region_shards / "internal", region_shards / "external"
    overrides = [f"data.source={internal}", f"run_root={tmp_path / 'runs'}", f"storage_path={tmp_path / 'ckpt'}",
                 "joints={" + ",".join(f"{j}: 1.0" for j in REGIONS) + "}", "optim.total_steps=2"]
    cfg = load_config(PretrainConfig, "configs/pretrain/seg3d-tiny.yaml", overrides)
    assert train(cfg)["sag"]["steps"] == 2
    resumed = load_config(PretrainConfig, "configs/pretrain/seg3d-tiny.yaml", overrides[:-1] + ["optim.total_steps=3"])
    assert train(resumed)["sag"]["steps"] == 3  # resumes from step 2's checkpoint
    log = (tmp_path / "runs" / "seg3d-tiny" / "sag" / "metrics.jsonl").read_text()
    assert '"event": "resume", "step": 2' in log
    url = publish_run(resumed, str(tmp_path / "hub"))["sag"]
    labels = json.loads((tmp_path / "hub" / Path(url).name / "labels.json").read_text())
    classes = json.loads((tmp_path / "hub" / Path(url).name / "config.json").read_text())["structures"]
    assert set(labels["tables"]) == set(REGIONS) and len(classes) >= 40

    result = run_seg_eval("configs/seg3d/eval-tiny.yaml", [
        f"model={url}", f"sets.internal.source={internal}", f"sets.external.source={external}", "bootstrap=20"],
        run_dir=tmp_path / "eval")
    sets = result["metrics"]["sets"]
    assert sets["internal"]["meta"]["site"] != ["D"] and sets["external"]["meta"]["site"] == ["D"]
    assert len(sets["internal"]["per_structure"]) == len(classes)
    assert set(sets["internal"]["per_region"]) <= set(REGIONS) and len(sets["internal"]["per_region"]) >= 2
    for res in sets.values():
        for r in res["per_structure"].values():
            assert r["dice"]["n"] == r["n_present"]  # only present structures are scored
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| structure | internal | external |" in report and "**region" in report

    raw = export_nnunet(str(internal), tmp_path / "nnunet", "sag", None, 502, "Regions")
    dataset = json.loads((Path(raw["folder"]) / "dataset.json").read_text())
    assert list(dataset["labels"].values()) == list(range(raw["classes"] + 1)) and raw["classes"] >= 40
    assert dataset["numTraining"] == len(list((Path(raw["folder"]) / "labelsTr").glob("*.nii.gz"))) > 0
    assert len(list((Path(raw["folder"]) / "imagesTr").glob("*_0000.nii.gz"))) == dataset["numTraining"]

    manifest = load_manifest(str(internal))
    torch.manual_seed(0)
    backbone = DiffusionBackbone(channels=(4, 8, 8), attention_levels=(False, False, False), num_res_blocks=1,
                                 num_head_channels=8, norm_num_groups=4, plane="sag",
                                 preprocessing=spec_from_manifest(manifest, "sag").to_dict(),
                                 schedule={"num_train_timesteps": 100})
    publish_backbone(backbone, backbone.make_scheduler(), str(tmp_path / "hub" / "regions-sag"), {}, manifest, {})
    init = load_config(PretrainConfig, "configs/pretrain/seg3d-tiny.yaml", overrides + [
        "model.arch=diffusion_unet", f"model.init_from={tmp_path / 'hub' / 'regions-sag'}"])
    seg = build_objective(init, "sag", manifest).build_model()
    assert torch.equal(seg.net.down_blocks[1].resnets[0].conv1.conv.weight,
                       backbone.unet.down_blocks[1].resnets[0].conv1.conv.weight)
    scratch = build_objective(load_config(PretrainConfig, "configs/pretrain/seg3d-tiny.yaml", overrides + [
        "model.arch=diffusion_unet", f"model.init_from={tmp_path / 'hub' / 'regions-sag'}",
        "model.load_weights=false"]), "sag", manifest).build_model()
    assert [p.shape for p in scratch.parameters()] == [p.shape for p in seg.parameters()]  # same network
    assert not torch.equal(scratch.net.down_blocks[1].resnets[0].conv1.conv.weight,
                           backbone.unet.down_blocks[1].resnets[0].conv1.conv.weight)

    prompt = run_prompt_study("configs/seg3d/prompt-tiny.yaml", [
        f"backbone={tmp_path / 'hub' / 'regions-sag'}", f"shards={internal}", "source_joints=[knee,shoulder,hip]",
        "target_joints=[ankle,elbow,wrist]", "train.epochs=1", "fine_tune.epochs=1", f"prompt_free={url}",
        "blocks=[down.1,mid]", "bootstrap=20"], run_dir=tmp_path / "prompt")
    methods = prompt["metrics"]["methods"]
    assert set(methods) == {"box", "zero_shot", "fine_tuned", "prompt_free"}
    n = prompt["metrics"]["n_prompts"]
    assert n > 0 and all(m["overall"]["n"] == n for m in methods.values())  # same prompts, same studies


def test_undeclared_label_values_are_named_by_the_export_and_the_evaluation(tmp_path):
    import json

    import nibabel as nib

    from downstream.seg3d.evaluate import SegEvalConfig, TestSetConfig, evaluate_sets
    from shards.nnunet import export_nnunet
    from shards.synth.vocab import STRUCTURES, synth_declaration
    from shards.writer import ShardWriter

    rng = np.random.default_rng(0)
    knee = list(STRUCTURES["knee"])
    with ShardWriter(tmp_path / "shards", kind="study", info={"source": "synthetic", "dataset": synth_declaration(["knee"]).to_dict()}) as writer:
        for i, split in enumerate(["train", "test"]):
            seg = np.zeros((8, 16, 16), np.uint8)
            seg[2:5, 4:9, 4:9] = 1
            seg[6, 1, 1] = 99  # not a knee structure
            writer.write({"__key__": f"s-{i}", "sag": rng.random((8, 16, 16)).astype(np.float32), "sag.seg": seg,
                          "meta": {"joint": "knee", "patient": f"p{i}", "site": "A", "field_strength": 3.0,
                                   "vendor": "v", "structures": knee,
                                   "planes": {"sag": {"spacing": [3.0, 1.0, 1.0], "shape": [8, 16, 16]}}}}, split)
    raw = export_nnunet(str(tmp_path / "shards"), tmp_path / "raw", "sag", ["knee"], 7, "Bad")
    assert raw["undeclared"] == [{"study": "s-0", "values": [99]}, {"study": "s-1", "values": [99]}]
    dataset = json.loads((Path(raw["folder"]) / "dataset.json").read_text())
    assert dataset["labels"]["ignore"] == len(knee)  # nnU-Net's ignore label: the highest value
    label = np.asarray(nib.load(Path(raw["folder"]) / "labelsTr" / "s-0.nii.gz").dataobj)
    assert label[6, 1, 1] == len(knee) and label[3, 5, 5] == 1

    model = SegNetwork(arch="dynunet", n_classes=len(knee), filters=[4, 8, 8], patch=[8, 16, 16],
                       structures=knee[1:], plane="sag").eval()
    cfg = SegEvalConfig(model="m", sets={"internal": TestSetConfig(str(tmp_path / "shards"), "test")}, bootstrap=10)
    result = evaluate_sets(cfg, model, {"tables": {"knee": knee}})
    assert result["undeclared"] == [{"set": "internal", "study": "s-1", "values": [99]}]
