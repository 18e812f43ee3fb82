"""Task models: finetune -> export (folder, s3) -> predict reproduces the run's test probabilities;
predict on DICOM and NIfTI written here (label maps back in the input's geometry); two Ray
workers; evaluate on an external-site cohort; altered or missing backbones refused (exit 2)."""

from __future__ import annotations

import getpass
import json
import shutil
from pathlib import Path

import nibabel as nib
from nibabel.orientations import axcodes2ornt, ornt_transform
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from downstream import cli
from downstream.evaluate import run_evaluate
from downstream.finetune import run_finetune
from downstream.predict import load_predict_config, run_predict
from downstream.task_model import TaskModelError, export_task_model, load_task_model
from downstream.tasks import load_task
from shards.build import BuildConfig, build_shards
from shards.config import load_config
from shards.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[1]
FAST = ["train.epochs=3", "metrics.bootstrap=20", "features.timesteps=[10]", "features.blocks=[mid,up.1]",
        "baselines.names=[]", "probe.enabled=false", "threads=1"]
TRAIN_SITES = ["A", "B", "C"]


def _build(out: Path, config: Path, overrides: list[str]) -> Path:
    build_shards(load_config(BuildConfig, config, [f"out={out}", *overrides]), progress=False)
    return out


@pytest.fixture(scope="module")
def knee_shards(tmp_path_factory) -> Path:
    """Knee studies from sites A-C only (site D is the external cohort), sagittal 8x32x32."""
    return _build(tmp_path_factory.mktemp("knee_shards"), ROOT / "configs/shards/tiny.yaml",
                  ["synth.n_patients=24", "synth.joints=[knee]", "synth.joint_weights=[1.0]", "synth.planes=[sag]",
                   f"synth.sites=[{','.join(TRAIN_SITES)}]", "synth.kspace.enabled=false", "shard_max_count=8"])


@pytest.fixture(scope="module")
def hub(knee_shards, tmp_path_factory) -> Path:
    from pretrain.models.diffusion import DiffusionBackbone
    from pretrain.preprocess import spec_from_manifest
    from pretrain.publish import publish_backbone

    hub = tmp_path_factory.mktemp("hub")
    manifest = load_manifest(str(knee_shards))
    torch.manual_seed(1000)
    model = DiffusionBackbone(channels=(4, 8), attention_levels=(False, False), num_res_blocks=1, num_head_channels=8,
                              norm_num_groups=4, plane="sag", preprocessing=spec_from_manifest(manifest, "sag").to_dict(),
                              schedule={"num_train_timesteps": 100})
    publish_backbone(model, model.make_scheduler(), str(hub / "knee-sag"), {}, manifest, {"steps": 0})
    return hub


def _task_args(shards: Path, hub: Path, tmp: Path) -> list[str]:
    return [f"shards={shards}", f"cache_dir={tmp / 'cache'}", f"out={tmp / 'runs'}", "planes=[sag]",
            f"backbones.sag={hub / 'knee-sag'}", *FAST]


@pytest.fixture(scope="module")
def dx_run(knee_shards, hub, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("dx")
    run_finetune("knee-dx", _task_args(knee_shards, hub, tmp), run_dir=tmp / "run")
    return tmp / "run"


@pytest.fixture(scope="module")
def seg_run(knee_shards, hub, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("seg")
    run_finetune("knee-seg", _task_args(knee_shards, hub, tmp) + ["structures=[femur,tibia,patella]"],
                 run_dir=tmp / "run")
    return tmp / "run"


def _cfg(hub: Path, *more: str):
    return load_predict_config(None, [f"backbone_dir={hub}", "threads=1", *more])


# ----- the artifact ------------------------------------------------------------------------------
def test_task_model_files_and_card(dx_run, tmp_path):
    model = dx_run / "model"
    for name in ("task_model.json", "heads.safetensors", "task_config.yaml", "metrics.json", "README.md"):
        assert (model / name).is_file(), name
    meta = json.loads((model / "task_model.json").read_text())
    assert meta["vocabulary"]["labels"] == load_task("knee-dx").labels and meta["planes"] == ["sag"]
    assert meta["backbones"]["sag"]["url"] == "<local>/knee-sag" and len(meta["backbones"]["sag"]["sha256"]) == 64
    assert set(meta["thresholds"]) == set(meta["vocabulary"]["labels"]) and meta["threshold_source"]
    heads = load_file(model / "heads.safetensors")  # standardisation statistics travel with the head
    stats = [k for k in heads if k.endswith((".mean", ".std"))]
    assert stats and all(bool(heads[k.rsplit(".", 1)[0] + ".fitted"]) for k in stats)
    card = (model / "README.md").read_text()
    header = card.split("---")[1]
    for key in ("license: apache-2.0", "pipeline_tag: image-classification", "base_model:", "tags:"):
        assert key in header, key
    assert "Not for clinical use" in card and "## Limitations" in card and "AUROC" in card and "[" in card
    for text in (card, (model / "task_config.yaml").read_text(), (model / "task_model.json").read_text()):
        assert str(tmp_path.parent) not in text and "/tmp" not in text and f"/{getpass.getuser()}/" not in text
    assert all(f.suffix in (".json", ".yaml", ".md", ".safetensors") for f in model.iterdir())


# ----- finetune -> export -> predict -------------------------------------------------------------
def test_export_then_predict_reproduces_test_split(dx_run, hub, knee_shards, tmp_path, s3_endpoint):
    folder = export_task_model(str(dx_run), str(tmp_path / "exported"))
    with pytest.raises(TaskModelError, match="already exists"):
        export_task_model(str(dx_run), folder)
    assert cli.main(["export", str(dx_run), "--to", "s3://mskfm-test/task-models/knee-dx"]) == 0
    out = tmp_path / "pred"
    code = cli.main(["predict", "--model", "s3://mskfm-test/task-models/knee-dx", str(knee_shards), "--out", str(out),
                     "split=test", f"backbone_dir={hub}", "threads=1"])
    assert code == 0
    pred = pd.read_csv(out / "predictions.csv")
    ref = pd.read_csv(dx_run / "study_predictions.csv")
    labels = json.loads((tmp_path / "exported" / "task_model.json").read_text())["vocabulary"]["labels"]
    assert set(pred["key"]) == set(ref["key"]) and (pred["status"] == "ok").all()
    merged = ref.merge(pred, on="key")
    for name in labels:
        assert np.abs(merged[f"diffusion/{name}"] - merged[f"prob/{name}"]).max() < 1e-6, name
        thr = json.loads((out / "predict.json").read_text())["thresholds"][name]
        assert (merged[f"decision/{name}"] == (merged[f"prob/{name}"] >= thr)).all()
    assert set(pred["planes"]) == {"sag"}


def test_logistic_probe_with_per_plane_features_reproduces(knee_shards, hub, tmp_path):
    run = tmp_path / "probe"
    run_finetune("knee-dx", _task_args(knee_shards, hub, tmp_path) + ["head.kind=logistic", "probe.cs=3",
                                                                       "features.per_plane.sag.timesteps=[20]"], run_dir=run)
    pred = run_predict(str(run), [str(knee_shards)], tmp_path / "pred", _cfg(hub, "split=test"))["predictions"]
    merged = pd.read_csv(run / "study_predictions.csv").merge(pred, on="key")
    assert len(merged) == len(pred) > 0
    cols = [c for c in merged.columns if c.startswith("diffusion/")]
    assert cols and all(np.abs(merged[c] - merged["prob/" + c.split("/", 1)[1]]).max() < 1e-6 for c in cols)


def test_altered_or_missing_backbone_refused(dx_run, hub, knee_shards, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    bad = tmp_path / "hub"
    shutil.copytree(hub, bad)
    weights = bad / "knee-sag" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, weights)
    with pytest.raises(TaskModelError, match=r"weights sha256 is [0-9a-f]{64}, the task model expects [0-9a-f]{64}"):
        load_task_model(str(dx_run), backbone_dir=str(bad))
    heads = tmp_path / "model"
    shutil.copytree(dx_run / "model", heads)
    (heads / "heads.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(TaskModelError, match="heads.safetensors cannot be read"):
        load_task_model(str(heads), backbone_dir=str(hub))
    assert cli.main(["export", str(dx_run), "--to", "hf://someone/knee-dx"]) == 2  # no HF_TOKEN here
    assert "needs a Hugging Face token" in capsys.readouterr().err
    args = ["predict", "--model", str(dx_run), str(knee_shards), "--out", str(tmp_path / "p")]
    assert cli.main([*args, f"backbone_dir={bad}"]) == 2
    assert "altered" in capsys.readouterr().err
    assert cli.main([*args, f"backbone_dir={tmp_path / 'nowhere'}"]) == 2
    err = capsys.readouterr().err
    assert "backbone for plane sag" in err and "is missing" in err
    assert not (tmp_path / "p" / "predictions.csv").exists()


# ----- DICOM and NIfTI inputs ---------------------------------------------------------------------
def test_predict_dicom_folder(dx_run, seg_run, hub, tmp_path, monkeypatch, capsys):
    from tests.test_ingest_dicom import PHI_STRINGS, SAG, write_series

    monkeypatch.delenv("MSKFM_DEID_SALT", raising=False)
    rng = np.random.default_rng(0)
    source = tmp_path / "export"
    for i in range(2):  # two knee studies; intensities scaled like the training data by RescaleSlope
        write_series(source / f"pat{i}" / "sag", {"PatientID": f"MRN{i}"}, f"1.2.3.{i}", SAG, 8, 3.0, "SAG PD FS",
                     rng, slope=0.001)
    out = tmp_path / "pred"
    summary = run_predict(str(dx_run), [str(source)], out, _cfg(hub))
    assert summary["n_predicted"] == 2 and summary["input"] == "dicom"
    pred = (out / "predictions.csv").read_text()
    assert all(k.startswith("s-") for k in pd.read_csv(out / "predictions.csv")["key"])
    for text in [pred, (out / "predict.json").read_text()]:
        assert not any(phi in text for phi in PHI_STRINGS) and str(source) not in text
    private = pd.read_csv(out / "sources.private.csv")
    assert set(private["key"]) == set(pd.read_csv(out / "predictions.csv")["key"])
    assert all(str(source) in s for s in private["sources"])
    assert (out / "sources.private.csv").stat().st_mode & 0o077 == 0

    seg = run_predict(str(seg_run), [str(source)], tmp_path / "seg", _cfg(hub))  # label maps in the stack's geometry
    img = nib.load(tmp_path / "seg" / seg["predictions"]["segmentation"].iloc[0])
    assert img.shape == (16, 16, 8)  # (cols, rows, slices) of the 16x16 images, 8 slices
    first_slice_lps = np.array([-10.0, 5.0, 20.0])  # write_series' first position along the normal
    assert np.allclose(img.affine @ [0, 0, 0, 1], [*(first_slice_lps * [-1, -1, 1]), 1])
    # columns along +y (0.6 mm), rows along -z (0.5 mm), slices along -x (3 mm) in LPS; x, y flipped in RAS
    assert np.allclose(img.affine[:3, :3], [[0, 0, 3.0], [-0.6, 0, 0], [0, -0.5, 0]])

    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    assert cli.main(["predict", "--model", str(dx_run), str(empty), "--out", str(tmp_path / "p2"),
                     f"backbone_dir={hub}"]) == 2
    assert "no usable DICOM study" in capsys.readouterr().err


def _nifti(sag: np.ndarray, axcodes: str) -> nib.Nifti1Image:
    """A sagittal stack as a NIfTI image stored with axes ``axcodes`` (3 mm slices along x)."""
    from shards.ingest.nifti import from_slices

    canonical = nib.Nifti1Image(np.ascontiguousarray(from_slices(sag, 0), dtype=np.float32),
                                np.array([[3.0, 0, 0, -12], [0, 0.5, 0, 4], [0, 0, 0.6, 30], [0, 0, 0, 1]]))
    return canonical.as_reoriented(ornt_transform(axcodes2ornt(tuple("RAS")), axcodes2ornt(tuple(axcodes))))


def test_predict_nifti_segmentation_in_input_geometry(seg_run, hub, knee_shards, tmp_path):
    from shards.reader import iter_samples

    samples = list(iter_samples(str(knee_shards), "test", ("sag",), rank=0, world_size=1))[:2]
    files = []  # one study stored twice in other axis orders, and one at another intensity scale
    for i, (s, axcodes) in enumerate(zip([samples[0], samples[0], samples[1]], ["RAS", "SPL", "LIA"])):
        scale = 1000.0 if i == 2 else 1.0  # another intensity scale: refused, the others predicted
        files.append(tmp_path / f"knee{i}_sag_pd.nii.gz")
        nib.save(_nifti(s["sag"] * scale, axcodes), files[-1])
    out = tmp_path / "pred"
    summary = run_predict(str(seg_run), [str(f) for f in files], out, _cfg(hub))
    assert summary["n_predicted"] == 2 and summary["n_failed"] == 1
    pred = pd.read_csv(out / "predictions.csv")
    failed = pred[pred["status"] == "failed"]
    assert "outside the model's intensity window" in failed["error"].iloc[0]
    private = pd.read_csv(out / "sources.private.csv")
    for _, row in pred[pred["status"] == "ok"].iterrows():
        src = nib.load(private.set_index("key").loc[row["key"], "sources"])
        seg = nib.load(out / row["segmentation"])
        assert seg.shape == src.shape and np.allclose(seg.affine, src.affine)
        labels = np.unique(np.asarray(seg.dataobj))
        assert set(labels) <= {0, 1, 2, 3} and len(labels) > 1
    ok = pred[pred["status"] == "ok"]["segmentation"]
    same = [np.asarray(nib.as_closest_canonical(nib.load(out / f)).dataobj) for f in ok]
    assert np.array_equal(same[0], same[1])  # the same labels in patient space, whatever the storage order


def test_evaluate_segmentation_on_shards(seg_run, hub, knee_shards, tmp_path):
    res = run_evaluate(str(seg_run), str(knee_shards), tmp_path / "eval", _cfg(hub, "split=test"))
    dice = res["metrics"]["mean"]["dice"]
    assert 0 <= dice["mean"] <= 1 and dice["n"] == res["n_studies"] > 0
    assert set(res["metrics"]["per_structure"]) == {"femur", "tibia", "patella"}


# ----- at scale and external sets ---------------------------------------------------------------
@pytest.mark.integration
def test_predict_two_ray_workers_matches_local(dx_run, hub, knee_shards, tmp_path, ray_local):
    local = run_predict(str(dx_run), [str(knee_shards)], tmp_path / "local", _cfg(hub))
    ray = run_predict(str(dx_run), [str(knee_shards)], tmp_path / "ray", _cfg(hub, "workers=2"))
    assert ray["timing"]["workers"] == 2 and len(ray["timing"]["devices"]) == 2
    a, b = (s["predictions"].sort_values("key").reset_index(drop=True) for s in (local, ray))
    assert list(a["key"]) == list(b["key"]) and len(a) == local["n_studies"] > 0
    assert np.allclose(a.filter(like="prob/"), b.filter(like="prob/"), atol=1e-6)
    assert ray["studies_per_s"] > 0


def test_evaluate_on_external_site(dx_run, hub, knee_shards, tmp_path, capsys):
    external = _build(tmp_path / "external", ROOT / "configs/shards/external-site.yaml",
                      ["synth.n_patients=10", "synth.joints=[knee]", "synth.joint_weights=[1.0]", "synth.planes=[sag]",
                       "synth.shape.sag=[8,32,32]", "synth.kspace.enabled=false"])
    trained_on = set(load_manifest(str(knee_shards))["stats"]["site"])
    assert trained_on == set(TRAIN_SITES)
    res = run_evaluate(str(dx_run), str(external), tmp_path / "eval", _cfg(hub))
    assert res["sites"] == ["D"] and "D" not in trained_on and res["n_studies"] > 0
    macro = res["metrics"]["macro"]
    assert "ci" in macro and len(macro["ci"]["auroc"]) == 2
    assert set(res["metrics"]["at_thresholds"]) == set(res["internal"]["metrics"]["per_label"])
    assert "internal AUROC" in (tmp_path / "eval" / "evaluation.md").read_text()
    # vocabulary mismatch: a knee model on shards without knee studies
    other = tmp_path / "ankle_only"
    shutil.copytree(external, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["stats"]["joint"] = {"ankle": 3}
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert cli.main(["evaluate", "--model", str(dx_run), "--shards", str(other), "--out", str(tmp_path / "e2"),
                     f"backbone_dir={hub}"]) == 2
    assert "vocabulary mismatch: the model is for knee" in capsys.readouterr().err
