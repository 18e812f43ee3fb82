"""Studies: bad input before any trial; each study --quick on tiny backbones, reports checked
against the trial results; a failing trial is reported and does not stop the study."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from downstream import cli
from downstream.data import patient_subset
from downstream.studies import run_study
from downstream.studies.config import load_study
from downstream.studies.summary import seed_interval
from shards.config import ConfigError

FAST = ["train.epochs=8", "metrics.bootstrap=20", "features.timesteps=[10]", "features.blocks=[mid]",
        "features.pooling=avg", "baselines.epochs=1"]


def write_task(folder: Path, name: str, joint: str, labels: list[str], shards: Path, hub: Path) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps({"kind": "diagnosis", "joint": joint, "planes": ["sag"], "labels": labels,
                                "backbones": {"sag": str(hub / "knee-sag")}, "shards": str(shards),
                                "cache_dir": str(folder / "cache"), "out": str(folder / "runs"),
                                "fusion": {"kind": "concat"}, "head": {"kind": "linear"}}))
    return path


@pytest.fixture(scope="module")
def study_env(study_shards, tmp_path_factory):
    """Task YAMLs (knee, ankle) on a tiny published knee backbone (a few DDPM steps)."""
    from downstream.studies.config import StudyBackboneSpec
    from downstream.studies.pretrained import train_backbone

    root = tmp_path_factory.mktemp("study_env")
    train_backbone(str(study_shards), ["knee"], "sag", 0, str(root / "hub" / "knee-sag"), StudyBackboneSpec(steps=3),
                   root / "pretrain")
    knee = write_task(root, "knee-t", "knee", ["acl", "effusion", "medial_meniscus"], study_shards, root / "hub")
    ankle = write_task(root, "ankle-t", "ankle", ["atfl", "osteochondral"], study_shards, root / "hub")
    return {"root": root, "knee": knee, "ankle": ankle}


def study_yaml(root: Path, name: str, body: dict) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(json.dumps(body))
    return path


def parse_cell(cell: str) -> tuple[float, float, float]:
    m = re.fullmatch(r"(-?[\d.]+)(?: \[(-?[\d.]+), (-?[\d.]+)\])?", cell.strip())
    assert m, cell
    return tuple(float(x) if x is not None else float("nan") for x in m.groups())


def md_table(md: str, header_start: str) -> pd.DataFrame:
    """The markdown table whose header row starts with ``| header_start``."""
    lines = md.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(f"| {header_start}"))
    rows = []
    for line in lines[i:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return pd.DataFrame(rows[2:], columns=rows[0])


def test_nested_patient_subsets():
    patients = pd.Series([f"p{i:02d}" for i in range(40)] * 2)
    for seed in range(3):
        sets = [set(patient_subset(patients, f, seed)) for f in (0.05, 0.1, 0.25, 0.5, 1.0)]
        assert all(a < b for a, b in zip(sets, sets[1:]))
        assert len(sets[-1]) == 40 and len(sets[2]) == 10
    assert set(patient_subset(patients, 0.5, 0)) != set(patient_subset(patients, 0.5, 1))


def test_covering_subsets_are_nested_and_hold_every_label():
    """A rare label (3 positives in 200 patients) is in every subset, down to 1 %; without cover most
    small random subsets lack it."""
    patients = pd.Series([f"p{i:03d}" for i in range(200)])
    labels = pd.DataFrame({"rare": [1.0 if i in (17, 99, 150) else 0.0 for i in range(200)],
                           "common": [float(i % 3 == 0) for i in range(200)], "never": 0.0})
    lacking = 0
    for seed in range(5):
        sets = [set(patient_subset(patients, f, seed, labels)) for f in (0.01, 0.05, 0.1, 0.5, 1.0)]
        assert all(a <= b for a, b in zip(sets, sets[1:])) and len(sets[-1]) == 200
        for s in sets:
            has = labels[patients.isin(s).to_numpy()]
            assert (has["rare"] == 1).any() and (has["common"] == 1).any()
        assert len(sets[0]) <= 3 and len(sets[3]) == 100
        lacking += not (labels[patients.isin(patient_subset(patients, 0.01, seed)).to_numpy()]["rare"] == 1).any()
    assert lacking >= 4


def test_bad_input_before_any_trial(study_env, tmp_path):
    root = study_env["root"]
    bad = study_yaml(root, "bad-fraction", {"task": str(study_env["knee"]), "fractions": [0.5, 1.5]})
    with pytest.raises(ConfigError, match=r"fractions \[1.5\] are outside \(0, 1\]"):
        load_study("label-efficiency", bad)
    assert cli.main(["study", "label-efficiency", "--space", str(bad), "--run-dir", str(tmp_path / "x")]) == 2

    tiny = study_yaml(root, "tiny-fraction", {"task": str(study_env["knee"]), "fractions": [0.05, 1.0],
                                              "seeds": [0], "overrides": FAST})
    with pytest.raises(ConfigError, match=r"trial fraction=0.05_seed=0: .*no positive for label"):
        run_study(load_study("label-efficiency", tiny), tmp_path / "le")
    assert not (tmp_path / "le").exists()

    missing = study_yaml(root, "missing-bb", {"targets": [str(study_env["knee"])], "sources": {"elbow": ["knee"]},
                                              "hub": str(tmp_path / "nohub"), "seeds": [0], "overrides": FAST})
    with pytest.raises(ConfigError, match=r"trial target=.*source=elbow.*missing backbone"):
        run_study(load_study("transfer", missing), tmp_path / "tr")
    assert not (tmp_path / "tr").exists()


@pytest.mark.integration
def test_label_efficiency_quick_report_matches_trials(study_env, ray_local, tmp_path):
    root, run = study_env["root"], tmp_path / "le"
    space = study_yaml(root, "le", {
        "task": str(study_env["knee"]), "fractions": [0.1, 1.0], "seeds": [0, 1],
        "overrides": ["baselines.names=[random_backbone]"] + FAST,
        "quick": {"fractions": [0.5, 1.0], "seeds": [0, 1]}})
    # a trial that fails at run time (its run folder cannot be created): reported, not fatal
    (run / "trials").mkdir(parents=True)
    (run / "trials" / "fraction=0.5_seed=1").write_text("in the way")
    assert cli.main(["study", "label-efficiency", "--space", str(space), "--quick", "--run-dir", str(run)]) == 0

    trials = pd.read_csv(run / "trials.csv")
    assert sorted(trials["trial"].unique()) == sorted(f"fraction={f}_seed={s}" for f in (0.5, 1.0) for s in (0, 1))
    failed = trials[trials["error"].notna()]
    assert list(failed["trial"]) == ["fraction=0.5_seed=1"] and "FileExistsError" in failed["error"].iloc[0]
    ok = trials[trials["error"].isna()]
    assert set(ok["model"]) == {"diffusion", "probe", "random_backbone", "random_backbone_probe"}
    for _, row in ok.iterrows():  # the trial table holds exactly what each finetune run wrote
        metrics = json.loads((run / "trials" / row["trial"] / "metrics.json").read_text())["metrics"]
        assert row["auroc"] == pytest.approx(metrics[row["model"]]["macro"]["auroc"], abs=1e-6)
    assert (ok[ok["fraction"] == 0.5]["n_train"] < ok[ok["fraction"] == 1.0]["n_train"].min()).all()

    md = (run / "report.md").read_text()
    table = md_table(md, "fraction")
    for _, row in table.iterrows():
        sel = ok[ok["fraction"] == float(row["fraction"])]
        for model in ("diffusion", "random_backbone"):
            got, runs = parse_cell(row[model]), sel[sel["model"] == model]
            if len(runs) > 1:   # t interval over seeds
                want = seed_interval(runs["auroc"])[:3]
            else:               # one seed: the trial's own bootstrap interval
                want = tuple(runs[["auroc", "auroc_lo", "auroc_hi"]].iloc[0])
            assert got == pytest.approx(want, abs=6e-4)
    assert table["seeds"].tolist() == ["1", "2"]
    assert "## Failed trials" in md and "fraction=0.5_seed=1" in md
    assert "![" in md and (run / "plots" / "label_efficiency.png").stat().st_size > 1000
    assert md.count("data:image/png;base64,") == 0
    assert (run / "report.html").read_text().count("data:image/png;base64,") == 1

    (run / "report.md").unlink()
    assert cli.main(["report", str(run)]) == 0
    assert (run / "report.md").read_text() == md


@pytest.mark.integration
def test_transfer_and_multi_anatomy_quick(study_env, ray_local, tmp_path):
    root, hub = study_env["root"], tmp_path / "hub"
    common = {"hub": str(hub), "seeds": [0], "make_backbones": {"steps": 3},
              "overrides": ["baselines.names=[random_backbone]"] + FAST}
    tr = study_yaml(root, "tr", common | {"targets": [str(study_env["knee"]), str(study_env["ankle"])],
                                          "sources": {"knee": ["knee"], "all": ["knee", "ankle"]}})
    assert cli.main(["study", "transfer", "--space", str(tr), "--make-backbones", "--run-dir", str(tmp_path / "tr")]) == 0
    assert sorted(p.name for p in hub.iterdir()) == ["all-sag", "knee-sag"]
    card = json.loads((hub / "all-sag" / "metrics.json").read_text())
    assert card["joints"] == ["knee", "ankle"] and card["steps"] == 3
    trials = pd.read_csv(tmp_path / "tr" / "trials.csv")
    assert trials["error"].isna().all() and len(trials.drop_duplicates("trial")) == 4
    table = md_table((tmp_path / "tr" / "report.md").read_text(), "pretrained on")
    assert table["pretrained on"].tolist() == ["knee ['knee']", "knee ['knee'] probe", "all ['knee', 'ankle']",
                                               "all ['knee', 'ankle'] probe", "random init", "random init probe"]
    for _, row in table.iterrows():
        for target in ("knee-t", "ankle-t"):
            col = next(c for c in table.columns if c.endswith(f"{target}.yaml"))
            source, probe = row["pretrained on"].split()[0], row["pretrained on"].endswith(" probe")
            model = {("random", False): "random_backbone", ("random", True): "random_backbone_probe"}.get(
                (source, probe), "probe" if probe else "diffusion")
            sel = trials[(trials["model"] == model) & trials["target"].str.endswith(f"{target}.yaml")]
            if model in ("diffusion", "probe"):
                sel = sel[sel["source"] == source]
            assert parse_cell(row[col])[0] == pytest.approx(sel["auroc"].item(), abs=6e-4)
    assert (tmp_path / "tr" / "plots" / "transfer_matrix.png").is_file()

    ma = study_yaml(root, "ma", common | {"task": str(study_env["knee"]), "sizes": [4, 8],
                                          "sources": {"all": ["knee", "ankle"]}})
    assert cli.main(["study", "multi-anatomy", "--space", str(ma), "--make-backbones", "--run-dir", str(tmp_path / "ma")]) == 0
    assert json.loads((hub / "all-n4-sag" / "metrics.json").read_text())["n_studies"] == 4
    trials = pd.read_csv(tmp_path / "ma" / "trials.csv")
    table = md_table((tmp_path / "ma" / "report.md").read_text(), "pretraining studies")
    assert table["pretraining studies"].tolist() == ["4", "8"]
    for _, row in table.iterrows():
        sel = trials[(trials["model"] == "diffusion") & (trials["size"] == int(row["pretraining studies"]))]
        assert parse_cell(row["all ['knee', 'ankle']"])[0] == pytest.approx(sel[sel["source"] == "all"]["auroc"].item(), abs=6e-4)
    assert (tmp_path / "ma" / "plots" / "multi_anatomy.png").is_file()


@pytest.mark.integration
def test_robustness_quick_drop(study_env, ray_local, tmp_path):
    space = study_yaml(study_env["root"], "rb", {"task": str(study_env["knee"]), "domain_key": "field_strength",
                                                  "seeds": [0, 1], "overrides": ["baselines.names=[]"] + FAST})
    assert cli.main(["study", "robustness", "--space", str(space), "--run-dir", str(tmp_path / "rb")]) == 0
    trials = pd.read_csv(tmp_path / "rb" / "trials.csv", dtype={"train_domain": str, "eval_domain": str})
    assert sorted(set(trials["train_domain"])) == ["1.5", "3.0"] and trials["error"].isna().all()
    cfg = json.loads((tmp_path / "rb" / "trials" / "train_domain=1.5_eval_domain=3.0_seed=0" / "metrics.json").read_text())
    assert cfg["n_train"] == trials.query("train_domain == '1.5'")["n_train"].iloc[0]
    drops = md_table((tmp_path / "rb" / "report.md").read_text(), "model")
    assert set(drops["model"]) == {"diffusion", "probe"}
    v = trials.set_index(["model", "train_domain", "eval_domain", "seed"])["auroc"]
    for _, row in drops.iterrows():
        m, test, train = row["model"], row["test"], row["trained on"]
        want = seed_interval([v[(m, test, test, s)] - v[(m, train, test, s)] for s in (0, 1)])
        assert parse_cell(row["drop in macro AUROC"]) == pytest.approx(want[:3], abs=6e-4)
