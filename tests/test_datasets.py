"""Datasets on their own terms: the dataset declaration (schema, inference, contradictions), v1 manifests
read as the synthetic vocabulary, multiclass/ordinal labels downstream, and a NIfTI hip dataset from
ingest through pretraining to a diagnosis and a segmentation task."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from shards.config import ConfigError
from shards.dataset import check_sample, dataset_of, load_declaration
from shards.ingest.cli import main as ingest_main
from shards.ingest.declare import infer_label
from shards.manifest import load_manifest
from shards.reader import iter_samples
from shards.synth.vocab import LABELS, STRUCTURES, synth_declaration

ROOT = Path(__file__).resolve().parents[1]
SALT = "hip-test-salt"
HIP_STRUCTURES = {"femoral_head": 1, "acetabulum": 2, "labrum": 3, "femoral_cartilage": 4,
                  "acetabular_cartilage": 5, "effusion_fluid": 7}  # value 6 left out on purpose
GRADES = ["none", "mild", "severe"]
DECLARATION = f"""
name: hip-test
anatomies:
  hip:
    labels:
      labral_tear: {{type: binary}}
      effusion: {{type: binary}}
      cartilage_grade: {{type: ordinal, classes: [{', '.join(GRADES)}]}}
    structures: {json.dumps(HIP_STRUCTURES)}
ehr:
  age: {{type: numeric, unit: years, range: [0, 120]}}
  bmi: {{type: numeric, unit: kg/m2, range: [10, 70]}}
  sex: {{type: categorical, values: [F, M]}}
planes: [sag]
"""


# ----- the declaration ----------------------------------------------------------------------------
def test_declaration_schema_errors_name_the_key(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text(DECLARATION)
    decl = load_declaration(path)
    assert decl.labels("hip")["cartilage_grade"].n_classes == 3 and decl.structure_values("hip")["labrum"] == 3
    path.write_text(DECLARATION.replace("unit: years", "units: years"))
    with pytest.raises(ConfigError, match="units"):
        load_declaration(path)
    path.write_text(DECLARATION.replace("type: ordinal", "type: grade"))
    with pytest.raises(ConfigError, match="cartilage_grade.type 'grade' unknown; known: binary, multiclass, ordinal"):
        load_declaration(path)
    path.write_text(DECLARATION.replace('"labrum": 3', '"labrum": 2'))
    with pytest.raises(ConfigError, match="distinct integers"):
        load_declaration(path)


def _as_v1(shards: Path, v1: Path) -> Path:
    """A copy of v2 shards as the previous writer left them: no declaration in the manifest or the
    saved build info, schema version 1 (samples are the same in both versions)."""
    shutil.copytree(shards, v1)
    for name in ("manifest.json", "_info.json"):
        saved = json.loads((v1 / name).read_text())
        assert saved.pop("dataset")["anatomies"].keys() == {"knee", "ankle", "shoulder"}
        if name == "manifest.json":
            assert saved["schema_version"] == 2
            saved["schema_version"] = 1
        (v1 / name).write_text(json.dumps(saved))
    return v1


def test_v1_manifest_reads_as_the_synthetic_vocabulary(tiny_shards, tmp_path):
    """A v1 shard folder maps to the generator's vocabulary, and a rerun of its build resumes it into v2."""
    from shards.build import BuildConfig, build_shards
    from shards.config import load_config

    from .conftest import TINY_SHARDS_CONFIG

    v1 = _as_v1(tiny_shards, tmp_path / "v1")
    decl = dataset_of(load_manifest(v1))
    assert set(decl.anatomies) == {"knee", "ankle", "shoulder"}
    assert list(decl.labels("knee")) == list(LABELS["knee"])
    assert list(decl.structure_values("ankle")) == list(STRUCTURES["ankle"])
    sample = next(iter_samples(v1, "train", fields=("meta", "labels", "sag", "sag.seg"), require=()))
    assert check_sample(decl, sample) == []
    rebuilt = build_shards(load_config(BuildConfig, TINY_SHARDS_CONFIG, [f"out={v1}"]), progress=False)
    assert rebuilt["generated"] == 0 and rebuilt["schema_version"] == 2 and "dataset" in rebuilt


@pytest.mark.integration
def test_v1_shards_finetune(tiny_shards, tiny_hub, tmp_path):
    from downstream.finetune import run_finetune

    v1 = _as_v1(tiny_shards, tmp_path / "v1")
    res = run_finetune("ankle-dx", [f"shards={v1}", f"cache_dir={tmp_path / 'cache'}", f"out={tmp_path / 'ft'}",
                                    "planes=[sag]", f"backbones={{sag: {tiny_hub / 'knee-sag'}}}", "train.epochs=2",
                                    "baselines.names=[]", "probe.enabled=false", "metrics.bootstrap=0",
                                    "features.timesteps=[10]", "features.blocks=[mid]"])
    assert set(res["metrics"]["diffusion"]["per_label"]) == set(LABELS["ankle"]) and res["n_eval"] > 0


def test_sample_contradictions():
    decl = synth_declaration()
    sample = {"meta": {"joint": "knee"}, "labels": {"acl": 2, "nope": 1}, "ehr": {"age": 300.0},
              "sag.seg": np.array([[[0, 15, 16]]], np.uint8)}
    problems = " / ".join(check_sample(decl, sample))
    assert "label 'acl': value 2 outside its classes 0/1" in problems and "label 'nope' is not declared" in problems
    assert "ehr 'age': value 300.0 outside its plausible range" in problems and "sag.seg values [16]" in problems
    assert check_sample(decl, {"meta": {"joint": "hip"}}) == ["anatomy 'hip' is not declared; anatomies: "
                                                               "knee, ankle, shoulder"]


def test_infer_label_types():
    assert infer_label(["yes", "no", "No", "1"]).type == "binary"
    assert infer_label(["0", "2", "1", "2", "0", "1"]).classes == ["0", "1", "2"]
    assert infer_label(["mild", "severe", "mild", "severe"]).classes == ["mild", "severe"]
    assert isinstance(infer_label(["Alice Smith", "Bob Jones", "mild", "mild"]), str)  # names stay out


# ----- multiclass labels downstream ---------------------------------------------------------------
def test_multiclass_outputs_loss_probs_and_metrics():
    from downstream.labels import expand_values, label_loss, multiclass_metrics, output_columns, to_probs
    from downstream.metrics import diagnosis_metrics
    from downstream.train import masked_bce

    specs = load_declaration_text(DECLARATION).labels("hip")
    cols = output_columns(["effusion", "cartilage_grade"], specs)
    assert cols == ["effusion", "cartilage_grade=none", "cartilage_grade=mild", "cartilage_grade=severe"]
    onehot = expand_values("cartilage_grade", specs["cartilage_grade"], [2, None, 0])
    assert onehot["cartilage_grade=severe"][0] == 1.0 and np.isnan(onehot["cartilage_grade=mild"][1])
    logits = torch.tensor([[0.3, 1.0, 2.0, 3.0], [0.0, 5.0, 0.0, 0.0]])
    probs = to_probs(logits, cols)
    assert torch.allclose(probs[:, 1:].sum(1), torch.ones(2)) and probs[0, 0] == torch.sigmoid(torch.tensor(0.3))
    target = torch.tensor([[1.0, 0.0, 0.0, 1.0], [np.nan, np.nan, np.nan, np.nan]])
    expected = (torch.nn.functional.binary_cross_entropy_with_logits(logits[0, 0], target[0, 0])
                + torch.nn.functional.cross_entropy(logits[:1, 1:], torch.tensor([2]))) / 2
    assert torch.isclose(label_loss(cols)(logits, target), expected)  # the unknown row adds nothing
    one_class = torch.full_like(target, float("nan"))
    one_class[0, 2] = 0.0  # per-output selection scores one output alone: a class has no loss of its own
    assert torch.isnan(label_loss(cols)(logits, one_class))
    binary = torch.tensor([[0.5, np.nan], [1.0, 0.0]])
    # binary-only tasks train and predict exactly as before (masked BCE, sigmoid)
    assert torch.equal(label_loss(["a", "b"])(logits[:, :2], binary), masked_bce(logits[:, :2], binary))
    assert torch.equal(to_probs(logits[:, :2], ["a", "b"]), torch.sigmoid(logits[:, :2]))
    # 6 patients, grades 0,0,1,1,2,2; predictions right but for one mild predicted severe
    grade = [0, 0, 1, 1, 2, 2]
    frame = pd.DataFrame({"patient": list("abcdef"), **expand_values("cartilage_grade", specs["cartilage_grade"], grade)})
    p = np.array([[.8, .1, .1], [.7, .2, .1], [.1, .8, .1], [.1, .3, .6], [.1, .1, .8], [.2, .1, .7]])
    frame = frame.assign(**{f"p_{c}": p[:, k] for k, c in enumerate(cols[1:])})
    per = diagnosis_metrics(frame, cols[1:], n_boot=0)["per_label"]
    multi = multiclass_metrics(frame, cols[1:], per)["cartilage_grade"]
    assert multi["confusion"] == [[2, 0, 0], [0, 1, 1], [0, 0, 2]] and multi["classes"] == GRADES
    assert multi["macro_auroc"] == pytest.approx(np.mean([per[c]["auroc"] for c in cols[1:]]))


def load_declaration_text(text: str):
    from omegaconf import OmegaConf

    from shards.dataset import declaration_from_dict

    return declaration_from_dict(OmegaConf.to_container(OmegaConf.create(text)), "test")


# ----- a NIfTI hip dataset end to end -------------------------------------------------------------
def _hip_source(root: Path, n_patients: int = 18) -> dict:
    """Sagittal hip volumes with label maps (structures as blobs; labels visible as intensity), a labels
    CSV and an EHR table. Three planted contradictions: a grade outside the classes, a BMI outside its
    range, a label map holding an undeclared value."""
    rng = np.random.default_rng(0)
    rows, ehr, truth = [], [], {}
    zz, yy, xx = np.meshgrid(np.arange(8), np.arange(24), np.arange(24), indexing="ij")
    for p in range(n_patients):
        tear, effusion, grade = p % 2, (p // 2) % 2, p % 3
        seg = np.zeros((8, 24, 24), np.uint8)
        for k, value in enumerate(HIP_STRUCTURES.values()):
            cy, cx = 4 + 3 * k, 6 + (k % 2) * 10
            seg[(yy - cy) ** 2 + (xx - cx) ** 2 < 9] = value
        if p == 5:
            seg[0, 0, 0] = 6  # undeclared structure value
        image = rng.normal(0, 0.1, seg.shape) + seg / 7.0 + tear * (seg == 3) + effusion * (seg == 7) + 0.3 * grade
        affine = np.diag([3.0, 0.7, 0.7, 1.0])  # 3 mm along x: sagittal slices, stored (x, y, z)
        folder = root / "images" / f"pt{p:02d}" / "visit1"
        folder.mkdir(parents=True)
        to_xyz = (0, 2, 1)
        nib.save(nib.Nifti1Image(np.transpose(image, to_xyz).astype(np.float32), affine), folder / "sag_pd.nii.gz")
        nib.save(nib.Nifti1Image(np.transpose(seg, to_xyz), affine), folder / "sag_pd_seg.nii.gz")
        rows.append({"study": f"pt{p:02d}/visit1", "labral_tear": "yes" if tear else "no", "effusion": effusion,
                     "cartilage_grade": "grade4" if p == 3 else GRADES[grade]})
        ehr.append({"patient_id": f"pt{p:02d}", "age": 30 + p, "sex": "F" if p % 2 else "M",
                    "bmi": 200.0 if p == 4 else 22.0 + p / 4})
        truth[f"pt{p:02d}"] = (tear, effusion, grade)
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    pd.DataFrame(ehr).to_csv(root / "ehr.csv", index=False)
    (root / "hip.yaml").write_text(DECLARATION)
    return truth


def _ingest(root: Path, out: Path, *extra: str) -> tuple[int, dict]:
    code = ingest_main(["nifti", str(root / "images"), "--out", str(out), f"run_dir={out}-run", "joint=hip",
                        f"labels.path={root / 'labels.csv'}", "labels.key_column=study",
                        f"ehr.path={root / 'ehr.csv'}", "ehr.key_column=patient_id", "ehr.key_kind=patient",
                        "splits={train: 0.6, val: 0.2, test: 0.2}", *extra])
    return code, json.loads((Path(f"{out}-run") / "ingest_report.json").read_text())


@pytest.fixture(scope="module")
def hip(tmp_path_factory):
    salt = pytest.MonkeyPatch()
    salt.setenv("MSKFM_DEID_SALT", SALT)
    root = tmp_path_factory.mktemp("hip")
    truth = _hip_source(root)
    code, report = _ingest(root, root / "shards", f"dataset={root / 'hip.yaml'}", "strict=true")
    yield root, truth, code, report
    salt.undo()


def test_hip_ingest_with_declaration_reports_contradictions(hip):
    root, truth, code, report = hip
    out = root / "shards"
    assert code == 1  # strict: the three contradictions fail the ingest ...
    manifest = load_manifest(out)  # ... and nothing written is lost
    assert manifest["schema_version"] == 2 and manifest["stats"]["n_samples"] == len(truth)
    assert dataset_of(manifest).structure_values("hip")["effusion_fluid"] == 7
    assert report["dataset"]["source"] == "declared" and report["dataset"]["path"] == "hip.yaml"
    problems = {c["problem"].split(":")[0]: c["study"] for c in report["contradictions"]}
    assert set(problems) == {"labels 'cartilage_grade'", "ehr 'bmi'", "sag.seg values [6] are not declared "
                             "structures of hip (declared"}, report["contradictions"]
    assert len(set(problems.values())) == 3  # one study each, by key
    samples = {s["__key__"]: s for sp in manifest["splits"]
               for s in iter_samples(out, sp, fields=("meta", "labels", "ehr", "sag", "sag.seg"), require=())}
    assert not any("sag.seg" in s for k, s in samples.items() if k == problems[next(p for p in problems if "seg" in p)])
    grades = sorted(s["labels"]["cartilage_grade"] for s in samples.values() if s["labels"]["cartilage_grade"] is not None)
    assert len(grades) == len(truth) - 1 and set(grades) == {0, 1, 2}
    assert sum(s["ehr"].get("bmi") is None for s in samples.values()) == 1
    assert report["phi_scan"]["n_hits"] == 0
    blob = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert b"pt03" not in blob and b"visit1" not in blob


def test_hip_ingest_infers_a_declaration_without_one(hip, tmp_path):
    root = hip[0]
    code, report = _ingest(root, tmp_path / "inferred")
    decl = report["dataset"]["declaration"]
    assert code == 0 and report["dataset"]["source"] == "inferred" and "confirm" in report["dataset"]
    hip_spec = decl["anatomies"]["hip"]
    assert hip_spec["labels"]["labral_tear"]["type"] == "binary" and hip_spec["labels"]["effusion"]["type"] == "binary"
    # 'grade4' is seen once: the column is not turned into classes, the report says so
    assert "cartilage_grade" not in hip_spec["labels"] and any("cartilage_grade" in n for n in report["dataset"]["notes"])
    assert hip_spec["structures"] == {f"structure_{v}": v for v in (1, 2, 3, 4, 5, 6, 7)}
    assert decl["ehr"]["bmi"]["type"] == "numeric" and decl["ehr"]["age"]["unit"] == "years"


@pytest.mark.integration
def test_hip_pretrain_diagnosis_and_segmentation_end_to_end(hip, tmp_path, capsys):
    """The Done-when path: declared hip shards -> `pretrain run` (local, 2 steps) -> `pretrain publish`
    -> a diagnosis task with a 3-class ordinal label and a segmentation task of the 6 structures."""
    from downstream.cli import main as downstream_main
    from downstream.finetune import run_finetune
    from pretrain.cli import main as pretrain_main

    root = hip[0]
    shards = root / "shards"
    assert downstream_main(["tasks", "--shards", str(shards)]) == 0
    listed = capsys.readouterr().out
    assert "cartilage_grade (ordinal: none, mild, severe)" in listed and "effusion_fluid=7" in listed
    runs = tmp_path / "runs"
    assert pretrain_main(["run", "--config", str(ROOT / "configs/pretrain/tiny.yaml"), f"data.source={shards}",
                          "joint=hip", "planes=[sag]", "launcher=local", "optim.total_steps=2", "optim.warmup_steps=1",
                          "checkpoint_every=2", "log_every=1", f"run_root={runs}", f"storage_path={tmp_path / 'ckpt'}",
                          "name=hip"]) == 0
    assert pretrain_main(["publish", "hip", "--to", str(tmp_path / "hub"), "--run-root", str(runs)]) == 0
    common = [f"shards={shards}", f"cache_dir={tmp_path / 'cache'}", f"out={tmp_path / 'ft'}", "joint=hip",
              "planes=[sag]", f"backbones={{sag: {tmp_path / 'hub' / 'hip-sag'}}}", "features.timesteps=[10]",
              "features.blocks=[mid,up.1]", "features.pooling=avg", "baselines.names=[]", "metrics.bootstrap=20"]
    (tmp_path / "hip-dx.yaml").write_text("kind: diagnosis\nlabels: [labral_tear, effusion, cartilage_grade]\n")
    dx = run_finetune(str(tmp_path / "hip-dx.yaml"), common + ["train.epochs=3", "probe.enabled=false"])
    grade = dx["metrics"]["diffusion"]["multiclass"]["cartilage_grade"]
    assert grade["classes"] == GRADES and np.array(grade["confusion"]).shape == (3, 3)
    assert sum(map(sum, grade["confusion"])) == grade["n"] > 0
    assert set(dx["metrics"]["diffusion"]["per_label"]) == {"labral_tear", "effusion", *(f"cartilage_grade={g}" for g in GRADES)}
    assert "cartilage_grade: macro AUROC" in dx["table"]
    card = (Path(dx["run_dir"]) / "model" / "README.md").read_text()
    assert "confusion matrix" in card and "| severe |" in card
    with pytest.raises(ConfigError, match="unknown hip labels \\['acl'\\]; known: labral_tear, effusion, cartilage_grade"):
        run_finetune(str(tmp_path / "hip-dx.yaml"), common + ["labels=[acl]"])
    (tmp_path / "hip-seg.yaml").write_text(f"kind: segmentation\nstructures: {list(HIP_STRUCTURES)}\n"
                                           "head: {kind: decoder, hidden: 8}\n")
    seg = run_finetune(str(tmp_path / "hip-seg.yaml"), common + ["train.epochs=2", "train.batch_size=4",
                                                                 "features.blocks=[mid,up.0,up.1]"])
    assert set(seg["metrics"]["diffusion"]["per_structure"]) == set(HIP_STRUCTURES)
    with pytest.raises(ConfigError, match="anatomy \\(joint\\) 'knee' is not in the dataset; anatomies: hip"):
        run_finetune(str(tmp_path / "hip-seg.yaml"), common + ["joint=knee"])


def test_fastmri_ingest_with_a_declaration(tmp_path, monkeypatch):
    from shards.ingest.fastmri import FastMRIError, ingest_fastmri
    from tests.recon_data import write_fastmri_file

    monkeypatch.setenv("MSKFM_DEID_SALT", SALT)
    (tmp_path / "src").mkdir()
    write_fastmri_file(tmp_path / "src" / "file1000001.h5", slices=2, coils=2, grid=(32, 32), recon=(32, 32))
    decl = load_declaration_text("anatomies: {knee: {}}\nplanes: [cor]\n")
    manifest = ingest_fastmri(tmp_path / "src", tmp_path / "out", dataset=decl)
    assert list(dataset_of(manifest).anatomies) == ["knee"] and manifest["stats"]["n_samples"] == 2
    with pytest.raises(FastMRIError, match="file1000001.h5: anatomy 'hip' is not declared; anatomies: knee"):
        ingest_fastmri(tmp_path / "src", tmp_path / "out2", anatomy="hip", dataset=decl)
