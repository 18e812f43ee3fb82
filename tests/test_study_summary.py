"""Study statistics without Ray: the vectorised bootstrap AUROC equals scikit-learn's, and the paired
patient bootstrap of a label-efficiency difference is paired, seed-averaged and refuses mismatched
test sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from downstream.studies.summary import PatientBootstrap, draw_aurocs

LABELS = ["effusion", "acl"]


def test_draw_aurocs_equal_scikit_learn_with_ties_and_unknown_labels():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60).astype(float)
    y[[3, 17, 40]] = np.nan
    p = np.round(rng.random(60) + 0.3 * np.nan_to_num(y), 1)  # rounded: many ties
    draws = np.vstack([np.arange(60), rng.integers(0, 60, (20, 60))])
    got = draw_aurocs(y, p, draws)
    for k, idx in enumerate(draws):
        yk, pk = y[idx], p[idx]
        known = np.isfinite(yk)
        assert got[k] == pytest.approx(roc_auc_score(yk[known].astype(int), pk[known]), abs=1e-12)
    one_class = np.zeros((1, 60), dtype=int) + int(np.flatnonzero(y == 1)[0])
    assert np.isnan(draw_aurocs(y, p, one_class))[0]


def write_trial(run_dir: Path, trial: str, patients: list[str], truth: dict, scores: dict) -> None:
    """A trial folder with a study_predictions.csv of two studies per patient."""
    rows = []
    for i, patient in enumerate(patients):
        for study in range(2):
            row = {"key": f"s{i}-{study}", "patient": patient, "split": "test"}
            row |= {label: truth[label][i] for label in LABELS}
            row |= {f"{model}/{label}": scores[model][label][i] for model in scores for label in LABELS}
            rows.append(row)
    folder = run_dir / "trials" / trial
    folder.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(folder / "study_predictions.csv", index=False)


@pytest.fixture()
def study_dir(tmp_path):
    rng = np.random.default_rng(1)
    patients = [f"p{i:03d}" for i in range(120)]
    truth = {label: rng.integers(0, 2, 120).astype(float) for label in LABELS}
    for seed in range(3):
        noise = {label: rng.normal(0, 1, 120) for label in LABELS}
        scores = {"good": {label: truth[label] + noise[label] for label in LABELS},
                  "good_copy": {label: truth[label] + noise[label] for label in LABELS},
                  "chance": {label: rng.random(120) for label in LABELS}}
        write_trial(tmp_path, f"fraction=0.1_seed={seed}", patients, truth, scores)
    return tmp_path, patients, truth


def test_paired_patient_bootstrap_separates_a_real_gap_and_pairs_identical_models(study_dir):
    run_dir, _, _ = study_dir
    trials = [f"fraction=0.1_seed={s}" for s in range(3)]
    boot = PatientBootstrap(run_dir, LABELS, n_boot=300)
    gap = boot.difference(trials, "good", "chance")
    assert gap["n_seeds"] == 3 and gap["n_patients"] == 120
    assert 0 < gap["lo"] < gap["difference"] < gap["hi"]
    observed = []
    for trial in trials:
        pat = boot.frame(trial)
        observed.append(np.mean([roc_auc_score(pat[label], pat[f"good/{label}"]) -
                                 roc_auc_score(pat[label], pat[f"chance/{label}"]) for label in LABELS]))
    assert gap["difference"] == pytest.approx(np.mean(observed), abs=1e-12)  # draw 0 = the observed sample
    same = boot.difference(trials, "good", "good_copy")  # paired: every draw's difference is exactly 0
    assert (same["difference"], same["lo"], same["hi"]) == (0.0, 0.0, 0.0)


def test_paired_patient_bootstrap_refuses_other_test_patients(study_dir):
    run_dir, patients, truth = study_dir
    scores = {"good": {label: truth[label][:-1] for label in LABELS},
              "chance": {label: np.zeros(119) for label in LABELS}}
    write_trial(run_dir, "fraction=1_seed=0", patients[:-1], {k: v[:-1] for k, v in truth.items()}, scores)
    boot = PatientBootstrap(run_dir, LABELS, n_boot=50)
    assert boot.difference(["fraction=0.1_seed=0"], "good", "chance") is not None
    assert boot.difference(["fraction=1_seed=0"], "good", "chance") is None
    assert boot.difference(["missing_trial"], "good", "chance") is None
