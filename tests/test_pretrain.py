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


def _kill_after_checkpoint(tmp: Path, name: str, step: int, runner: threading.Thread) -> int:
    """SIGKILL rank 1 once Ray Train has registered checkpoint ``step``; returns the killed pid.

    Ray Train registers a reported checkpoint when its controller next polls the workers and
    records it in the run's snapshot, so wait for it there (a report alone may be lost).
    """
    snapshot = tmp / "ckpt" / name / "sag" / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 240
    while not (snapshot.is_file() and f"checkpoint_{step:08d}" in snapshot.read_text()):
        assert runner.is_alive() and time.monotonic() < deadline, "run ended before the kill"
        time.sleep(0.05)
    victim = int((tmp / "runs" / name / "sag" / "pids" / "rank1.pid").read_text())
    os.kill(victim, signal.SIGKILL)
    return victim


def test_ray_kill_restart_resume_publish_reload(tiny_shards, ray_local, tmp_path, capsys):
    """Two Ray Train workers with DeepSpeed ZeRO-1: a SIGKILLed worker restarts the group from the
    last checkpoint, a second run of the same name resumes, and the published EMA backbone reloads."""
    args = _args(tiny_shards, tmp_path, "two", "optim.total_steps=24", "optim.lr=0.01",
                 "checkpoint_every=8", "log_every=1")
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(rc=main(args)), daemon=True)
    runner.start()
    victim = _kill_after_checkpoint(tmp_path, "two", 8, runner)
    runner.join(timeout=300)
    assert outcome.get("rc") == 0
    recs = _records(tmp_path, "two")
    assert recs[0] == {**recs[0], "event": "start", "world_size": 2}
    assert all(k in recs[1] for k in ("loss", "lr", "samples_per_s", "data_wait_frac"))
    resume = [r for r in recs if r.get("event") == "resume"]
    assert len(resume) == 1 and resume[0]["step"] in (8, 16), recs
    assert int((tmp_path / "runs" / "two" / "sag" / "pids" / "rank1.pid").read_text()) != victim
    after = recs[recs.index(resume[0]) + 1:]
    assert [r["step"] for r in after if "loss" in r][0] == resume[0]["step"] + 1
    first_loss = next(r["loss"] for r in recs if r.get("step") == 1)
    resumed_loss = next(r["loss"] for r in after if "loss" in r)
    # restored weights: the loss continues from the checkpointed state, far below the initial loss
    assert resumed_loss < 0.8 * first_loss, (first_loss, resumed_loss)
    assert [r["steps"] for r in recs if r.get("event") == "done"] == [24]

    # the same command again (two more steps) resumes at step 24 instead of starting over
    assert main(args + ["optim.total_steps=26"]) == 0
    recs = _records(tmp_path, "two")
    assert [r["step"] for r in recs if r.get("event") == "resume"][-1] == 24
    assert [r["steps"] for r in recs if r.get("event") == "done"] == [24, 26]
    assert [r["step"] for r in recs if "loss" in r][-2:] == [25, 26]

    hub = tmp_path / "hub"
    argv = ["publish", "two", "--to", str(hub), "--run-root", str(tmp_path / "runs")]
    assert main(argv) == 0
    from pretrain.models import DiffusionBackbone

    model = DiffusionBackbone.from_pretrained(hub / "knee-sag").eval()
    assert model.config.plane == "sag"
    with torch.no_grad():
        feats = model.features(torch.zeros(1, 1, 8, 32, 32), timesteps=[10], blocks=["down.0", "mid", "up.1"])
    assert sorted(feats) == ["t10/down.0", "t10/mid", "t10/up.1"]
    assert tuple(feats["t10/down.0"].shape) == (1, 4, 8, 32, 32)
    assert tuple(feats["t10/mid"].shape) == (1, 8, 4, 16, 16)
    assert tuple(feats["t10/up.1"].shape) == (1, 4, 8, 32, 32)
    card = json.loads((hub / "knee-sag" / "metrics.json").read_text())
    assert card["steps"] == 26 and card["weights"] == "ema"

    capsys.readouterr()
    assert main(argv) == 2  # an existing version is not overwritten silently
    assert "already exists" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0


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


def test_nonfinite_loss_stops_without_checkpoint(tiny_shards, tmp_path, capsys):
    import re

    args = _args(tiny_shards, tmp_path, "nan", "launcher=local", "optim.total_steps=6",
                 "optim.lr=1e30", "optim.clip=0", "optim.warmup_steps=1", "checkpoint_every=1")
    assert main(args) == 2  # one line on stderr, exit code 2 (as under the Ray launcher)
    err = capsys.readouterr().err
    assert re.search(r"pretrain run: error: sag: non-finite loss .* at step \d+ \(rank 0\); samples: \w+", err)
    bad_step = int(err.split("at step ")[1].split()[0])
    saved = sorted(int(p.name.split("_")[1]) for p in (tmp_path / "ckpt" / "nan" / "sag").glob("checkpoint_*"))
    assert saved and max(saved) == bad_step - 1  # checkpoints up to the last finite step, none after
