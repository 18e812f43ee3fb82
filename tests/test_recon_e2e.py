"""Tiny VarNet: pretrain (DeepSpeed, local launcher) -> publish -> eval-recon, all through the CLIs."""

import json

import numpy as np
import pytest

from pretrain.cli import main as pretrain_main
from shards.writer import ShardWriter
from tests.recon_data import phantom_slice

pytestmark = pytest.mark.integration
CONFIG = "configs/pretrain/recon-tiny.yaml"


def test_varnet_pretrain_publish_eval(tiny_recon_shards, tmp_path, capsys):
    common = [f"data.source={tiny_recon_shards}", f"run_root={tmp_path}/runs", f"storage_path={tmp_path}/ckpt"]
    assert pretrain_main(["run", "--config", CONFIG, *common, "optim.total_steps=2"]) == 0
    assert pretrain_main(["publish", "recon-tiny", "--run-root", f"{tmp_path}/runs", "--to", f"{tmp_path}/hub"]) == 0
    published = tmp_path / "hub" / "recon-varnet"
    assert (published / "diffusion_pytorch_model.safetensors").is_file()
    assert "reconstruction backbone" in (published / "README.md").read_text()
    capsys.readouterr()
    assert pretrain_main(["eval-recon", str(published), "--data", str(tiny_recon_shards), "--masks",
                          "equispaced1d", "--accelerations", "4,8", "--set", f"run_root={tmp_path}/eval",
                          "--set", "max_slices=4", "--set", "figure_slices=2"]) == 0
    out = capsys.readouterr().out
    assert "### equispaced1d, 4x" in out and "### equispaced1d, 8x" in out and "| all | zero-filled |" in out
    metrics = json.loads((tmp_path / "eval" / "eval" / "metrics.json").read_text())
    methods = {(r["acceleration"], r["method"]) for r in metrics["summary"] if r["group"] == "all"}
    assert methods == {(a, m) for a in (4.0, 8.0) for m in ("backbone", "zero-filled")}
    zf = {r["acceleration"]: r["ssim"] for r in metrics["summary"] if r["group"] == "all" and r["method"] == "zero-filled"}
    assert zf[4.0] > zf[8.0]  # more undersampling, worse zero-filled image
    assert (tmp_path / "eval" / "eval" / "examples.png").stat().st_size > 1000


def test_nan_kspace_stops_training_naming_the_slice(tmp_path):
    with ShardWriter(tmp_path / "bad", kind="recon") as w:
        for i in range(2):
            k, _, _ = phantom_slice((32, 32), coils=3, seed=i)
            if i == 1:
                k[0, 5, 5] = np.nan
            w.write({"__key__": f"s-bad-sag00{i}", "kspace": k, "meta": {"coils": 3, "slice": i, "study": "s-bad",
                                                                         "anatomy": "knee"}}, "train")
    with pytest.raises(ValueError, match=r"sample 's-bad-sag001' \(study s-bad, slice 1\): kspace contains NaN"):
        pretrain_main(["run", "--config", CONFIG, f"data.source={tmp_path}/bad", f"run_root={tmp_path}/runs",
                       f"storage_path={tmp_path}/ckpt", "optim.total_steps=2"])
    assert not list((tmp_path / "ckpt").rglob("checkpoint_*"))


def test_transfer_study_heatmap(tiny_recon_shards, tmp_path, capsys):
    overrides = ["kind=transfer", f"source={tiny_recon_shards}", "anatomies=[knee,shoulder]", "train_slices=4",
                 "base_config=configs/pretrain/recon-tiny.yaml", "overrides=[optim.total_steps=1]",
                 "max_eval_slices=8", f"run_root={tmp_path}", "name=t"]
    assert pretrain_main(["recon-study", "--config", "configs/sweeps/recon-transfer.yaml", *overrides]) == 0
    assert "knee (4 slices): ssim" in capsys.readouterr().out
    results = json.loads((tmp_path / "t" / "metrics.json").read_text())["results"]
    assert [r["condition"] for r in results] == ["knee", "shoulder"]
    assert all(0 < r["test"][a]["ssim"] <= 1 for r in results for a in r["test"])
    assert (tmp_path / "t" / "heatmap.png").stat().st_size > 1000
    report = (tmp_path / "t" / "report.md").read_text()  # recon studies report like the downstream ones
    assert "| condition | trained on | train slices | tested on | ssim | psnr | nmse |" in report
    ssim = results[0]["test"]["knee"]["ssim"]
    assert f"| knee | knee | 4 | knee | {ssim:.4f} |" in report and "base64" in (tmp_path / "t" / "report.html").read_text()


def test_data_size_study_single_vs_multi_anatomy(tiny_recon_shards, tmp_path, capsys):
    from shards.reader import iter_samples

    overrides = ["kind=data-size", f"source={tiny_recon_shards}", "anatomies=[knee,shoulder]", "sizes=[4]",
                 "base_config=configs/pretrain/recon-tiny.yaml", "overrides=[optim.total_steps=1]",
                 "max_eval_slices=8", f"run_root={tmp_path}", "name=d"]
    assert pretrain_main(["recon-study", "--config", "configs/sweeps/recon-data-size.yaml", *overrides]) == 0
    results = json.loads((tmp_path / "d" / "metrics.json").read_text())["results"]
    assert [(r["condition"], r["train_slices"]) for r in results] == [
        ("single-knee-n4", 4), ("single-shoulder-n4", 4), ("multi-n4", 4)]
    multi = {s["meta"]["anatomy"] for s in iter_samples(str(tmp_path / "d/data/multi-n4"), "train", ("meta",))}
    single = {s["meta"]["anatomy"] for s in iter_samples(str(tmp_path / "d/data/single-knee-n4"), "train", ("meta",))}
    assert multi == {"knee", "shoulder"} and single == {"knee"}
    assert all(set(r["test"]) == {"knee", "shoulder"} for r in results)
    assert (tmp_path / "d" / "heatmap.png").stat().st_size > 1000
    # the folder resumes by condition name: other data settings under the same name are refused
    assert pretrain_main(["recon-study", "--config", "configs/sweeps/recon-data-size.yaml", *overrides, "sizes=[2]"]) == 2
    assert "holds a study with other sizes (sizes: [4] -> [2])" in capsys.readouterr().err


def test_study_too_large_for_its_source_fails_before_training(tiny_recon_shards, tmp_path, capsys):
    overrides = ["kind=data-size", f"source={tiny_recon_shards}", "anatomies=[knee,shoulder]", "sizes=[2,1000]",
                 "base_config=configs/pretrain/recon-tiny.yaml", f"run_root={tmp_path}", "name=big"]
    assert pretrain_main(["recon-study", "--config", "configs/sweeps/recon-data-size.yaml", *overrides]) == 2
    assert "needs 1000 training slices of knee" in capsys.readouterr().err
    assert not (tmp_path / "big" / "runs").exists()


def test_varnet_on_ray_launcher_two_workers(tiny_recon_shards, ray_local, tmp_path):
    """The recon objective runs on the same Ray Train + DeepSpeed (ZeRO-1) launcher as the diffusion
    backbones; the published VarNet reloads and reconstructs."""
    from pretrain.models.recon import VarNetBackbone

    args = ["run", "--config", CONFIG, f"data.source={tiny_recon_shards}", f"run_root={tmp_path}/runs",
            f"storage_path={tmp_path}/ckpt", "launcher=ray", "ray.num_workers=2", "optim.total_steps=4",
            "log_every=1", "name=recon-ray"]
    assert pretrain_main(args) == 0
    recs = [json.loads(line) for line in (tmp_path / "runs/recon-ray/recon/metrics.jsonl").read_text().splitlines()]
    assert recs[0]["event"] == "start" and recs[0]["world_size"] == 2
    assert [r["steps"] for r in recs if r.get("event") == "done"] == [4]
    assert all(np.isfinite(r["loss"]) for r in recs if "loss" in r)
    assert pretrain_main(["publish", "recon-ray", "--run-root", f"{tmp_path}/runs", "--to", f"{tmp_path}/hub"]) == 0
    model = VarNetBackbone.from_pretrained(tmp_path / "hub" / "recon-varnet").eval()
    assert model.config.num_cascades == 2
