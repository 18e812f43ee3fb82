"""Head training a reviewer would accept: standardisation with training-row statistics saved with the
head, selection on the selection split only, class balance, the closed-form reference probe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, load_model, save_model
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.preprocessing import StandardScaler

from downstream import finetune
from downstream.diagnosis import feature_batcher
from downstream.heads.linear import PlaneHead
from downstream.heads.probe import LogisticProbe, fit_probe
from downstream.pooling import Pooler
from downstream.finetune import run_finetune
from downstream.tasks import load_task
from downstream.train import fit, fit_selected, label_losses, label_rows, masked_bce, mean_loss, pos_weights, predict
from tests.test_downstream import task_args


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def scaled_maps(n=60, seed=0):
    """Two blocks whose channels differ in scale by 10^6; the label lives in a tiny-scale channel."""
    rng = np.random.default_rng(seed)
    big = rng.normal(500.0, 300.0, (n, 3, 2, 2, 2)).astype(np.float32)
    small = rng.normal(0.0, 1e-3, (n, 2, 1, 2, 2)).astype(np.float32)
    y = (small[:, 0].mean(axis=(1, 2, 3)) > 0).astype(np.float32)
    y = np.stack([y, 1 - y], axis=1)
    y[3, 1] = np.nan                                                # an unknown label
    return {"t1/mid": big, "t1/up.0": small}, y


def test_standardization_uses_training_rows_and_round_trips(tmp_path):
    maps, y = scaled_maps()
    train, other = np.arange(40), np.arange(40, 60)
    batcher = feature_batcher({"sag": maps}, y)
    torch.manual_seed(0)
    head = PlaneHead("sag", [3, 2], 2, "linear", "avg")
    assert not bool(head.pool.scale.fitted)                        # the identity until trained or loaded
    fit(head, batcher, train, masked_bce, epochs=100, lr=3e-2, seed=0)
    pooled = head.pool(batcher(train)[0]["sag"]).detach().numpy()   # standardised per pooled feature
    np.testing.assert_allclose(pooled.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(pooled.std(axis=0), 1, atol=1e-3)
    # the statistics come from the training rows only: other rows changing changes nothing
    maps2 = {k: v.copy() for k, v in maps.items()}
    for v in maps2.values():
        v[other] *= 7
    torch.manual_seed(0)
    head2 = PlaneHead("sag", [3, 2], 2, "linear", "avg")
    fit(head2, feature_batcher({"sag": maps2}, y), train, masked_bce, epochs=100, lr=3e-2, seed=0)
    for a, b in zip(head.state_dict().values(), head2.state_dict().values()):
        torch.testing.assert_close(a, b)
    # the stats are saved with the head and applied at prediction
    save_model(head, str(tmp_path / "head.safetensors"))
    loaded = PlaneHead("sag", [3, 2], 2, "linear", "avg")
    load_model(loaded, str(tmp_path / "head.safetensors"))
    assert bool(loaded.pool.scale.fitted) and bool(loaded.pool.scale_maps[1].fitted)
    torch.testing.assert_close(loaded.pool.scale.std, head.pool.scale.std)
    torch.testing.assert_close(predict(loaded, batcher, other), predict(head, batcher, other))
    # and they are what lets a linear head read the tiny-scale channel
    auroc = _auroc(y[other, 0], predict(head, batcher, other)[:, 0].numpy())
    assert auroc > 0.8, auroc


def _auroc(y, p):
    from sklearn.metrics import roc_auc_score

    return roc_auc_score(y, p)


def test_pos_weights_and_masked_weighted_bce():
    y = np.array([[1, 0], [0, 0], [0, np.nan], [0, 1], [np.nan, 1]], dtype=np.float32)
    w = pos_weights(y)
    torch.testing.assert_close(w, torch.tensor([3.0, 1.0]))        # 3 neg / 1 pos; 2 neg / 2 pos
    assert pos_weights(np.array([[0.0], [0.0]]))[0] == 1.0           # one class only: unweighted
    logits = torch.zeros(5, 2, requires_grad=True)
    loss = masked_bce(logits, torch.from_numpy(y), w)
    loss.backward()
    assert logits.grad[2, 1] == 0 and logits.grad[4, 0] == 0          # unknown labels stay masked
    assert abs(float(logits.grad[0, 0])) == pytest.approx(3 * abs(float(logits.grad[1, 0])))


def test_fit_selected_keeps_the_best_epoch_and_weight_decay_on_selection_rows():
    maps, y = scaled_maps(n=80, seed=1)
    y[::5, 0] = 1 - y[::5, 0]                                       # label noise: late epochs overfit
    batcher = feature_batcher({"sag": maps}, y)
    train, select = np.arange(30), np.arange(30, 60)
    model, history, sel = fit_selected(lambda: PlaneHead("sag", [3, 2], 2, "mlp", "avg", hidden=64),
                                       batcher, train, select, masked_bce, epochs=60, lr=3e-2,
                                       weight_decays=[0.0, 0.3], patience=8, seed=0)
    assert [c["weight_decay"] for c in sel.candidates] == [0.0, 0.3]
    assert sel.loss == min(c["loss"] for c in sel.candidates)
    assert mean_loss(model, batcher, select, masked_bce) == pytest.approx(sel.loss, rel=1e-5)
    assert all(c["epochs_run"] <= 60 for c in sel.candidates) and 1 <= sel.epoch <= len(history)
    # without selection rows: the last epoch of the first weight decay
    _, hist, none = fit_selected(lambda: PlaneHead("sag", [3, 2], 2, "linear", "avg"), batcher, train, [],
                                 masked_bce, epochs=5, lr=1e-2, weight_decays=[0.0, 0.3], seed=0)
    assert none.loss is None and none.epoch == 5 and len(none.candidates) == 1


def test_linear_heads_select_each_label_on_its_own_selection_loss():
    """A clear label and a pure-noise label: the noise label's selection loss is lowest in the first
    epochs, the clear one's late. Each row is taken from its own label's best epoch and weight decay,
    and the chosen rows reproduce those losses; heads with shared trained parts keep one joint choice."""
    rng = np.random.default_rng(0)
    n = 120
    signal = rng.normal(0, 1, (n, 2, 1, 2, 2)).astype(np.float32)
    clear = (signal[:, 0].mean(axis=(1, 2, 3)) > 0).astype(np.float32)
    y = np.stack([clear, rng.integers(0, 2, n).astype(np.float32)], axis=1)
    batcher = feature_batcher({"sag": {"t1/mid": signal}}, y)
    train, select = np.arange(60), np.arange(60, 120)
    build = lambda: PlaneHead("sag", [2], 2, "linear", "avg")  # noqa: E731
    model, _, sel = fit_selected(build, batcher, train, select, masked_bce, epochs=40, lr=3e-2,
                                 weight_decays=[1e-4, 1e-1], patience=0, seed=0)
    assert label_rows(model) == ["head.bias", "head.weight"]
    clear_pick, noise_pick = sel.per_label
    assert clear_pick["epoch"] > noise_pick["epoch"]
    assert label_losses(model, batcher, select, masked_bce) == pytest.approx(
        [clear_pick["loss"], noise_pick["loss"]], rel=1e-5)
    assert label_rows(PlaneHead("sag", [2], 2, "linear", "attention")) is None
    assert label_rows(PlaneHead("sag", [2], 2, "mlp", "avg")) is None


def pooled_reference(maps: dict, rows: np.ndarray) -> np.ndarray:
    """mean and std over voxels per channel of every block, concatenated (numpy)."""
    parts = []
    for a in maps.values():
        flat = a.reshape(len(a), a.shape[1], -1).astype(np.float64)
        parts += [flat.mean(axis=2), flat.std(axis=2)]
    return np.concatenate(parts, axis=1)[rows]


def test_reference_probe_matches_scikit_learn():
    maps, y = scaled_maps(n=70, seed=2)
    groups = np.array([f"p{i // 2}" for i in range(70)])            # two studies per patient
    train, test = np.arange(50), np.arange(50, 70)
    probe = LogisticProbe({"sag": [3, 2]}, 2)
    chosen = fit_probe(probe, feature_batcher({"sag": maps}, y), train, y, groups, cs=6, folds=4, seed=0)
    ours = torch.sigmoid(predict(probe, feature_batcher({"sag": maps}, y), test)).numpy()
    scaler = StandardScaler().fit(pooled_reference(maps, train))
    x_tr, x_te = scaler.transform(pooled_reference(maps, train)), scaler.transform(pooled_reference(maps, test))
    for k in range(2):
        known = np.isfinite(y[train, k])
        cv = list(StratifiedGroupKFold(n_splits=4, shuffle=True, random_state=0).split(
            x_tr[known], y[train][known, k].astype(int), groups[train][known]))
        ref = LogisticRegressionCV(Cs=6, l1_ratios=(0.0,), cv=cv, scoring="neg_log_loss", class_weight="balanced",
                                   max_iter=5000, use_legacy_attributes=False).fit(x_tr[known], y[train][known, k])
        assert chosen[k]["C"] == pytest.approx(ref.C_) and chosen[k]["n"] == int(known.sum())
        np.testing.assert_allclose(ours[:, k], ref.predict_proba(x_te)[:, 1], atol=2e-4)
    assert _auroc(y[test, 0], ours[:, 0]) > 0.9


@pytest.mark.parametrize("kind", ["avg", "attention", "self_attention", "global_local", "mean_std"])
def test_pooling_shapes(kind):
    pool = Pooler(kind, [4, 8])
    maps = [torch.randn(5, 4, 2, 4, 4), torch.randn(5, 8, 1, 2, 2)]
    assert pool(maps).shape == (5, pool.out_dim)


# ----- end to end: no choice reads the evaluation split -------------------------------------------
def _flip(split: str):
    """``load_studies`` with the known labels of ``split`` flipped (unknown stay unknown)."""
    real = finetune.load_studies

    def load(task):
        frame = real(task)
        rows = frame["split"] == split
        frame.loc[rows, task.labels] = 1.0 - frame.loc[rows, task.labels]
        return frame

    return load


def _saved(run: Path) -> dict:
    tensors = {"diffusion": load_file(str(run / "head.safetensors"))}
    tensors |= {p.stem: load_file(str(p)) for p in (run / "models").glob("*.safetensors")}
    return tensors


def test_no_choice_reads_the_evaluation_split(tiny_shards, tiny_hub, tmp_path, monkeypatch):
    args = task_args(tiny_shards, tiny_hub, tmp_path, planes=("sag",)) + [
        "planes=[sag]", "baselines.names=[random_backbone,scratch_cnn]", "train.epochs=6", "train.patience=2",
        "train.weight_decay_grid=[1e-4,0.3]", "probe.folds=2", "metrics.bootstrap=0"]
    first = run_finetune("knee-dx", args, run_dir=tmp_path / "a")
    monkeypatch.setattr(finetune, "load_studies", _flip("test"))
    second = run_finetune("knee-dx", args, run_dir=tmp_path / "b")
    assert set(first["selection"]) == {"diffusion", "probe", "random_backbone", "random_backbone_probe", "scratch_cnn"}
    assert first["selection"] == second["selection"]
    meta = [json.loads((tmp_path / r / "head.json").read_text()) for r in ("a", "b")]
    assert meta[0]["thresholds"] == meta[1]["thresholds"]
    a, b = _saved(tmp_path / "a"), _saved(tmp_path / "b")
    assert a.keys() == b.keys()
    for name in a:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)
    pa, pb = (pd.read_csv(tmp_path / r / "predictions.csv") for r in ("a", "b"))
    probs = [c for c in pa.columns if "/" in c]
    pd.testing.assert_frame_equal(pa[probs], pb[probs])
    labels = load_task("knee-dx").labels

    def aurocs(res):
        return [res["metrics"]["diffusion"]["per_label"][n]["auroc"] for n in labels]

    assert not np.allclose(aurocs(first), aurocs(second), equal_nan=True)   # only the evaluation metrics move
    # the check can fail: flipping the selection split's labels does change the choices
    monkeypatch.setattr(finetune, "load_studies", _flip("val"))
    third = run_finetune("knee-dx", args, run_dir=tmp_path / "c")
    assert third["selection"] != first["selection"]


def test_per_plane_feature_spec():
    from downstream.features import feature_parts
    from shards.config import ConfigError

    task = load_task("knee-dx-ortho")
    recipe = {p: (task.features.for_plane(p).timesteps, task.features.for_plane(p).blocks) for p in task.planes}
    assert recipe == {"sag": ([200], ["mid_0"]), "cor": ([150], ["mid_0"]), "ax": ([50], ["mid_2"])}
    old = load_task("knee-dx")                                     # no per_plane: every plane as before
    assert old.features.for_plane("cor").timesteps == old.features.timesteps and not old.features.per_plane
    parts = {p: feature_parts("b", {}, task.features.for_plane(p), "m", "knee", p) for p in task.planes}
    assert parts["sag"]["blocks"] == ["mid_0"] and parts["ax"]["timesteps"] == [50]
    assert feature_parts("b", {}, old.features.for_plane("sag"), "m", "knee", "sag") == feature_parts(
        "b", {}, old.features, "m", "knee", "sag")                 # old configs keep their cache keys
    half = load_task("knee-dx", ["features.per_plane.ax.blocks=[mid_1]"]).features
    assert half.for_plane("ax").blocks == ["mid_1"] and half.for_plane("ax").timesteps == half.timesteps
    with pytest.raises(ConfigError, match=r"per_plane has planes \['obl'\]"):
        load_task("knee-dx", ["planes=[sag]", "features.per_plane.obl.blocks=[mid]"])
