"""Pretraining engine, end to end on the tiny config: Ray Train + DeepSpeed (gloo, CPU) workers,
checkpoints and resume, a SIGKILLed worker, a corrupt checkpoint, publishing and reloading."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from pretrain.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "pretrain" / "tiny.yaml")

pytestmark = pytest.mark.integration


def _args(shards: Path, tmp: Path, name: str, *extra: str) -> list[str]:
    return ["run", "--config", TINY, f"data.source={shards}", f"run_root={tmp}/runs",
            f"storage_path={tmp}/ckpt", f"name={name}", *extra]


def _records(tmp: Path, name: str, plane: str = "sag") -> list[dict]:
    path = tmp / "runs" / name / plane / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_ray_deepspeed_train_resume_publish_reload(tiny_shards, ray_local, tmp_path, capsys):
    assert main(_args(tiny_shards, tmp_path, "two")) == 0
    recs = _records(tmp_path, "two")
    steps = [r for r in recs if "loss" in r and "event" not in r]
    assert [r["step"] for r in steps] == [2, 4, 6, 8]
    assert all(k in steps[0] for k in ("lr", "samples_per_s", "data_wait_frac"))
    assert recs[0] == {**recs[0], "event": "start", "world_size": 2}
    assert (tmp_path / "ckpt" / "two" / "sag" / "checkpoint_00000008" / "loop_state.json").is_file()

    # the same command with more steps resumes at step 8 instead of starting over
    assert main(_args(tiny_shards, tmp_path, "two", "optim.total_steps=10")) == 0
    recs = _records(tmp_path, "two")
    resumed = [r for r in recs if r.get("event") == "resume"]
    assert len(resumed) == 1 and resumed[0]["step"] == 8
    assert [r["steps"] for r in recs if r.get("event") == "done"] == [8, 10]

    hub = tmp_path / "hub"
    argv = ["publish", "two", "--to", str(hub), "--run-root", str(tmp_path / "runs")]
    assert main(argv) == 0
    from pretrain.models import DiffusionBackbone

    model = DiffusionBackbone.from_pretrained(hub / "knee-sag").eval()
    assert model.config.plane == "sag"
    x = torch.zeros(1, 1, 8, 32, 32)
    with torch.no_grad():
        feats = model.features(x, timesteps=[10], blocks=["down.0", "mid", "up.1"])
    assert sorted(feats) == ["t10/down.0", "t10/mid", "t10/up.1"]
    assert tuple(feats["t10/down.0"].shape) == (1, 4, 8, 32, 32)
    assert tuple(feats["t10/mid"].shape) == (1, 8, 4, 16, 16)
    assert tuple(feats["t10/up.1"].shape) == (1, 4, 8, 32, 32)
    card = json.loads((hub / "knee-sag" / "metrics.json").read_text())
    assert card["steps"] == 10 and card["weights"] == "ema"

    capsys.readouterr()
    assert main(argv) == 2  # an existing version is not overwritten silently
    assert "already exists" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0


def test_killed_worker_restarts_from_checkpoint(tiny_shards, ray_local, tmp_path):
    args = _args(tiny_shards, tmp_path, "kill", "optim.total_steps=24", "optim.lr=0.01",
                 "checkpoint_every=8", "log_every=1")
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(rc=main(args)), daemon=True)
    runner.start()
    pid_file = tmp_path / "runs" / "kill" / "sag" / "pids" / "rank1.pid"
    deadline = time.monotonic() + 240
    # Ray Train registers a reported checkpoint when its controller next polls the workers, and
    # records it in the run's snapshot: kill only once checkpoint 8 is registered there.
    snapshot = tmp_path / "ckpt" / "kill" / "sag" / "checkpoint_manager_snapshot.json"
    while not (snapshot.is_file() and "checkpoint_00000008" in snapshot.read_text()):
        assert runner.is_alive() and time.monotonic() < deadline, "run ended before the kill"
        time.sleep(0.05)
    victim = int(pid_file.read_text())
    os.kill(victim, signal.SIGKILL)
    runner.join(timeout=300)
    assert outcome.get("rc") == 0
    recs = _records(tmp_path, "kill")
    resume = [r for r in recs if r.get("event") == "resume"]
    assert len(resume) == 1 and resume[0]["step"] in (8, 16), recs
    assert int(pid_file.read_text()) != victim  # a fresh worker group ran the rest
    after = recs[recs.index(resume[0]) + 1:]
    first_loss = next(r["loss"] for r in recs if r.get("step") == 1)
    ckpt_loss = next(r["loss"] for r in recs if r.get("step") == resume[0]["step"])
    resumed_loss = next(r["loss"] for r in after if "loss" in r)
    assert [r["step"] for r in after if "loss" in r][0] == resume[0]["step"] + 1
    # restored weights: the loss continues near the checkpoint, far below the from-scratch loss
    assert resumed_loss < 0.8 * first_loss, (first_loss, ckpt_loss, resumed_loss)
    assert [r["steps"] for r in recs if r.get("event") == "done"] == [24]


def test_corrupt_checkpoint_is_reported_by_path(tiny_shards, tmp_path, capsys):
    args = _args(tiny_shards, tmp_path, "bad", "launcher=local", "optim.total_steps=2",
                 "checkpoint_every=2")
    assert main(args) == 0
    ckpt = tmp_path / "ckpt" / "bad" / "sag" / "checkpoint_00000002"
    victim = ckpt / "state" / "mp_rank_00_model_states.pt"
    victim.write_bytes(victim.read_bytes()[:100])
    capsys.readouterr()
    assert main(args[:-2] + ["optim.total_steps=4", "checkpoint_every=2"]) == 2
    err = capsys.readouterr().err
    assert f"corrupt checkpoint {ckpt}" in err and str(victim) in err


def test_nonfinite_loss_stops_without_checkpoint(tiny_shards, tmp_path):
    from pretrain.loop import NonFiniteLossError

    args = _args(tiny_shards, tmp_path, "nan", "launcher=local", "optim.total_steps=6",
                 "optim.lr=1e30", "optim.clip=0", "optim.warmup_steps=1", "checkpoint_every=1")
    with pytest.raises(NonFiniteLossError, match=r"at step \d+ \(rank 0\); samples: \w+") as info:
        main(args)
    bad_step = int(str(info.value).split("at step ")[1].split()[0])
    saved = sorted(int(p.name.split("_")[1]) for p in (tmp_path / "ckpt" / "nan" / "sag").glob("checkpoint_*"))
    assert saved and max(saved) == bad_step - 1  # checkpoints up to the last finite step, none after
