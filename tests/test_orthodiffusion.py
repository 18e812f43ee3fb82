"""OrthoDiffusion's plane backbones: the class, its preprocessing, `pretrain import` and downstream use.

Checkpoints here are written in OrthoDiffusion's layout (``{"step", "model", "ema", "opt"}``, the
network under ``denoise_fn.`` next to GaussianDiffusion's schedule buffers), from a tiny backbone.
Parity with OrthoDiffusion's own code is measured outside the repository (docs/backbones.md).
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from downstream import cli as downstream_cli
from downstream.finetune import run_finetune
from pretrain import cli
from pretrain.importers import CheckpointImportError, import_checkpoint
from pretrain.models import BACKBONES, DiffusionBackbone, OrthoDiffusionBackbone
from pretrain.preprocess import PlanePreprocessing, preprocess_volume
from pretrain.publish import load_backbone
from shards.config import ConfigError

# OrthoDiffusion's create_model(256, 64, 1) (train.py), counted with its own code (see docs/backbones.md)
PUBLISHED_PARAMETERS = 34_524_545
TINY = ["model_channels=8", "channel_mult=[1,2]", "attention_levels=[false,true]", "norm_num_groups=4",
        "preprocessing.shape=[8,32,32]"]
TINY_KW = dict(model_channels=8, channel_mult=(1, 2), attention_levels=(False, True), norm_num_groups=4,
               preprocessing={"plane": "sag", "shape": [8, 32, 32], "spatial": "crop_resize", "intensity": "minmax"})


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cosine_betas(n: int, s: float = 0.008) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule, as OrthoDiffusion's GaussianDiffusion stores it."""
    f = np.cos((np.arange(n + 1) / n + s) / (1 + s) * math.pi / 2) ** 2
    return np.clip(1 - f[1:] / f[:-1], 0, 0.999)


def orthodiffusion_checkpoint(path, seed=0, betas=None, edit=None):
    """A model.pt in OrthoDiffusion's layout; ``ema`` differs from ``model`` (by +1) so the pick shows."""
    torch.manual_seed(seed)
    net = OrthoDiffusionBackbone(**TINY_KW)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    opt = torch.optim.Adam(net.parameters())                 # a real optimizer state, as OrthoDiffusion saves
    net(torch.zeros(1, 1, 8, 32, 32), torch.tensor([5])).sum().backward()
    opt.step()
    betas = cosine_betas(1000) if betas is None else betas
    buffers = {"betas": torch.tensor(betas, dtype=torch.float32),
               "alphas_cumprod": torch.tensor(np.cumprod(1 - betas), dtype=torch.float32)}
    model = {f"denoise_fn.{k}": v.clone() for k, v in net.state_dict().items()} | buffers
    ema = {f"denoise_fn.{k}": v + 1.0 for k, v in net.state_dict().items()} | buffers
    if edit:
        edit(ema)
    torch.save({"step": 4999, "model": model, "ema": ema, "opt": opt.state_dict()}, path)
    return net


# ----- the class ---------------------------------------------------------------------------------
def test_published_size_matches_orthodiffusion():
    """Parameter count and the parameter names OrthoDiffusion's checkpoints use, at the published size."""
    with torch.device("meta"):
        model = OrthoDiffusionBackbone()
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS
    keys = model.state_dict()
    for key, shape in {"time_embed.0.weight": (256, 64), "input_blocks.0.0.weight": (64, 1, 3, 3, 3),
                       "input_blocks.2.0.op.weight": (64, 64, 3, 3, 3),
                       "input_blocks.5.0.skip_connection.weight": (128, 64, 1, 1, 1),
                       "input_blocks.9.1.qkv.weight": (768, 256, 1), "middle_block.1.proj_out.weight": (256, 256, 1),
                       "middle_block.2.out_layers.3.weight": (256, 256, 3, 3, 3),
                       "output_blocks.0.0.in_layers.0.weight": (512,), "output_blocks.1.2.conv.weight": (256, 256, 3, 3, 3),
                       "output_blocks.9.0.emb_layers.1.weight": (64, 256), "out.2.weight": (1, 64, 3, 3, 3)}.items():
        assert tuple(keys[key].shape) == shape, key
    assert model.block_names() == ([f"in_{i}" for i in range(10)] + ["mid_0", "mid_1", "mid_2"]
                                   + [f"out_{i}" for i in range(10)])
    assert model.preprocessing.shape == [16, 256, 256] and model.preprocessing.intensity == "minmax"
    sched = model.make_scheduler()
    assert sched.config.num_train_timesteps == 1000
    assert np.allclose(sched.betas.numpy(), cosine_betas(1000), atol=1e-6)
    assert BACKBONES["orthodiffusion"] is OrthoDiffusionBackbone


def test_features_shapes_early_stop_and_errors():
    torch.manual_seed(0)
    model = OrthoDiffusionBackbone(**TINY_KW).eval()
    x = torch.randn(2, 1, 8, 32, 32)
    with torch.no_grad():
        feats = model.features(x, [10, 900], ["in_0", "mid_1", "out_2"], seed=3)
        again = model.features(x[:1], [900], ["out_2"], seed=3)
    assert feats["t10/in_0"].shape == (2, 8, 8, 32, 32) and feats["t900/mid_1"].shape == (2, 16, 4, 16, 16)
    assert feats["t900/out_2"].shape == (2, 8, 8, 32, 32)
    assert torch.allclose(feats["t900/out_2"][:1], again["t900/out_2"], atol=1e-5)  # batch-independent
    assert model(x, torch.tensor([1, 2])).shape == x.shape
    with pytest.raises(ValueError, match="unknown feature block.*valid: in_0"):
        model.features(x, [10], ["mid"])
    with pytest.raises(ValueError, match="outside \\[0, 1000\\)"):
        model.features(x, [1000], ["in_0"])
    with pytest.raises(ValueError, match="divisible by 2"):
        model.features(torch.randn(1, 1, 7, 32, 32), [10], ["in_0"])
    assert model.block_prefix("mid_2") == "middle_block.2." and model.block_prefix("out_3") == "output_blocks.3."


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = OrthoDiffusionBackbone(**TINY_KW, activation_checkpointing=checkpointing)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.1)
        model(torch.ones(1, 1, 8, 32, 32), torch.tensor([7])).square().mean().backward()
        grads.append(model.input_blocks[1][0].in_layers[2].weight.grad)
    assert model.gradient_checkpointing and torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_orthodiffusion_preprocessing():
    """16 central slices kept (never resampled), bilinear in-plane, per-volume min-max to [-1, 1]."""
    spec = PlanePreprocessing(plane="sag", shape=[16, 20, 20], spatial="crop_resize", intensity="minmax")
    vol = np.random.default_rng(0).random((21, 40, 30)).astype(np.float32) * 500 + 20
    out = preprocess_volume(vol, spec)
    ref = torch.nn.functional.interpolate(torch.from_numpy(vol[2:18])[None], size=(20, 20), mode="bilinear")[0]
    ref = (ref - ref.min()) / (ref.max() - ref.min()) * 2 - 1
    assert out.shape == (1, 16, 20, 20) and torch.allclose(out[0], ref, atol=1e-5)
    padded = preprocess_volume(vol[:10], spec)
    assert padded.shape == (1, 16, 20, 20) and float(padded.min()) == -1.0
    assert torch.all(padded[0, :3] == -1) and torch.all(padded[0, 13:] == -1)  # zero slices, central data
    with pytest.raises(ValueError, match="preprocessing.intensity 'zscore' is unknown"):
        PlanePreprocessing.from_dict({"plane": "sag", "intensity": "zscore"})


# ----- import ------------------------------------------------------------------------------------
def test_import_prefers_ema_and_writes_a_backbone_folder(tmp_path):
    ckpt = tmp_path / "model.pt"
    net = orthodiffusion_checkpoint(ckpt)
    dest = tmp_path / "hub" / "orthodiffusion-sag"
    assert import_checkpoint(str(ckpt), "orthodiffusion", "sag", str(dest), TINY) == str(dest)
    for f in ("config.json", "diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
              "README.md", "import.json"):
        assert (dest / f).is_file(), f
    model, scheduler, spec = load_backbone(str(dest))
    assert isinstance(model, OrthoDiffusionBackbone)
    for k, v in net.state_dict().items():
        assert torch.equal(model.state_dict()[k], v + 1.0), k        # the EMA weights, names unchanged
    assert spec.spatial == "crop_resize" and spec.intensity == "minmax" and spec.shape == [8, 32, 32]
    assert scheduler.config.beta_schedule == "squaredcos_cap_v2" and scheduler.config.num_train_timesteps == 1000
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    prov = json.loads((dest / "import.json").read_text())
    assert prov["sha256"] == sha and prov["weights"] == "ema" and prov["step"] == 4999
    card = (dest / "README.md").read_text()
    for text in (sha, "license: mit", "MIT", "@misc{orthodiffusion2026", "github.com/lt-0123/OrthoDiffusion",
                 "`mid_2`", "Research use only"):
        assert text in card, text
    again = OrthoDiffusionBackbone.from_pretrained(str(dest))
    x = preprocess_volume(np.random.default_rng(1).random((8, 32, 32)).astype(np.float32), spec)[None]
    with torch.no_grad():
        a, b = model.features(x, [50], ["mid_2", "out_3"]), again.features(x, [50], ["mid_2", "out_3"])
    assert all(torch.equal(a[k], b[k]) for k in a) and torch.isfinite(a["t50/out_3"]).all()


def _drop(key):
    return lambda sd: sd.pop(key)


def _reshape(key):
    return lambda sd: sd.__setitem__(key, torch.zeros(3, 3))


@pytest.mark.parametrize("edit, message", [
    (_drop("denoise_fn.middle_block.1.qkv.weight"), r"missing key\(s\) middle_block.1.qkv.weight"),
    (_reshape("denoise_fn.out.2.weight"), r"shape mismatch at key 'out.2.weight': checkpoint \(3, 3\)"),
    (lambda sd: sd.__setitem__("denoise_fn.label_emb.weight", torch.zeros(3, 32)), r"unexpected key\(s\) label_emb"),
    (lambda sd: sd["denoise_fn.time_embed.0.bias"].fill_(float("nan")), "key 'time_embed.0.bias' holds NaN"),
])
def test_import_refuses_bad_checkpoints_naming_the_key(tmp_path, edit, message):
    orthodiffusion_checkpoint(tmp_path / "model.pt", edit=edit)
    with pytest.raises(CheckpointImportError, match=message):
        import_checkpoint(str(tmp_path / "model.pt"), "orthodiffusion", "sag", str(tmp_path / "out"), TINY)
    assert not (tmp_path / "out").exists()


def test_import_refuses_other_architectures_schedules_and_sizes(tmp_path):
    other = DiffusionBackbone(channels=(4, 8), attention_levels=(False, False), num_res_blocks=1,
                              num_head_channels=8, norm_num_groups=4)
    torch.save({"ema": other.state_dict()}, tmp_path / "monai.pt")
    with pytest.raises(CheckpointImportError, match="not a checkpoint of format 'orthodiffusion': none of its .* unet.conv_in"):
        import_checkpoint(str(tmp_path / "monai.pt"), "orthodiffusion", "sag", str(tmp_path / "out"), TINY)
    orthodiffusion_checkpoint(tmp_path / "linear.pt", betas=np.linspace(1e-4, 0.02, 1000))
    with pytest.raises(CheckpointImportError, match="key 'betas' .* is not the noise schedule cosine with 1000"):
        import_checkpoint(str(tmp_path / "linear.pt"), "orthodiffusion", "sag", str(tmp_path / "out"), TINY)
    orthodiffusion_checkpoint(tmp_path / "model.pt")
    with pytest.raises(CheckpointImportError, match=r"missing key\(s\) input_blocks.4.0.op.bias.*another size"):
        import_checkpoint(str(tmp_path / "model.pt"), "orthodiffusion", "sag", str(tmp_path / "out"))  # published size
    with pytest.raises(ConfigError, match="key 'channels'"):
        import_checkpoint(str(tmp_path / "model.pt"), "orthodiffusion", "sag", str(tmp_path / "out"), ["channels=[4]"])
    with pytest.raises(ConfigError, match="unknown import format 'monai'"):
        import_checkpoint(str(tmp_path / "model.pt"), "monai", "sag", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


class _RunsCode:
    """Unpickling this calls ``open(marker, 'w')``: code execution from a checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_unsafe_pickle_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "executed"
    torch.save({"ema": {"denoise_fn.out.2.bias": torch.zeros(1)}, "hook": _RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointImportError, match=r"refused, the file needs unpickling of code, not only tensors \(it references io.open\)"):
        import_checkpoint(str(tmp_path / "evil.pt"), "orthodiffusion", "sag", str(tmp_path / "out"), TINY)
    assert not marker.exists() and not (tmp_path / "out").exists()


# ----- end to end: CLI import, then downstream finetune on the imported backbone ------------------
def test_cli_import_then_finetune(tiny_shards, tmp_path, capsys):
    orthodiffusion_checkpoint(tmp_path / "model.pt")
    dest = tmp_path / "hub" / "od-sag"
    def argv(plane, to, sets=TINY):
        return ["import", str(tmp_path / "model.pt"), "--format", "orthodiffusion", "--plane", plane, "--to", str(to),
                *(f"--set={kv}" for kv in sets)]

    assert cli.main(argv("sag", dest)) == 0 and (dest / "config.json").is_file()
    assert cli.main(argv("sag", dest)) == 2 and "already exists" in capsys.readouterr().err  # never overwritten silently
    assert cli.main(argv("cor", tmp_path / "hub" / "od-cor", sets=())) == 2                  # published size
    assert "missing key(s) input_blocks.4.0.op.bias" in capsys.readouterr().err
    assert not (tmp_path / "hub" / "od-cor").exists()
    args = [f"shards={tiny_shards}", f"cache_dir={tmp_path / 'cache'}", f"out={tmp_path / 'runs'}",
            "planes=[sag]", f"backbones.sag={dest}", "baselines.names=[]", "train.epochs=3", "metrics.bootstrap=20",
            "features.timesteps=[10]", "features.blocks=[mid_2,out_1]"]
    res = run_finetune("knee-dx", args, run_dir=tmp_path / "ft")
    assert "diffusion" in res["metrics"] and (tmp_path / "ft" / "head.safetensors").is_file()
    assert "each volume's min-max" in (tmp_path / "ft" / "model" / "README.md").read_text()
    out = tmp_path / "pred"
    assert downstream_cli.main(["predict", "--model", str(tmp_path / "ft"), str(tiny_shards), "--out", str(out),
                                "threads=1", f"backbone_dir={dest.parent}"]) == 0
    summary = json.loads((out / "predict.json").read_text())
    assert summary["n_predicted"] > 0 and all("missing plane" in f["error"] for f in summary["failed"])  # no sag
    tuned = run_finetune("knee-dx", args + ["head.finetune_blocks=[mid_2]", "train.epochs=2"], run_dir=tmp_path / "tuned")
    assert tuned["history"]["diffusion"][-1] < tuned["history"]["diffusion"][0]



# ----- paper size (issue 19): the published-size config trains one step on CPU ----------------------
PAPER_STEP = """
import json, resource, sys, time
import torch
from shards.config import load_config
from shards.manifest import load_manifest
from pretrain.config import PretrainConfig
from pretrain.objectives import build_objective
torch.manual_seed(0)
cfg = load_config(PretrainConfig, "configs/pretrain/orthodiffusion-knee.yaml",
                  [f"data.source={sys.argv[1]}", "model.activation_checkpointing=true"])
obj = build_objective(cfg, "sag", load_manifest(cfg.data.source))
model = obj.build_model().train()
before = model.out[2].weight.detach().clone()
opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
x = torch.rand(1, 1, *cfg.shape) * 2 - 1
start = time.time()
loss = obj.loss(model, {"x": x, "keys": ["k"]}, torch.Generator().manual_seed(0))
loss.backward()
opt.step()
print(json.dumps({"loss": loss.item(), "seconds": round(time.time() - start, 1),
                  "changed": not torch.equal(before, model.out[2].weight),
                  "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}))
"""


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(3600)  # ~2 min of CPU time; 24 min of wall time when the 2 cores are shared (docs/backbones.md)
def test_paper_size_config_builds_and_trains_one_cpu_step(tiny_shards, tmp_path):
    """configs/pretrain/orthodiffusion-knee.yaml: OrthoDiffusion's size on every plane; one training step
    at batch 1 (16x256x256, activation checkpointing) in a fresh process whose peak memory is recorded."""
    import subprocess
    import sys
    from pathlib import Path

    from pretrain.config import PretrainConfig
    from pretrain.objectives import build_objective
    from shards.config import load_config
    from shards.manifest import load_manifest

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(PretrainConfig, root / "configs/pretrain/orthodiffusion-knee.yaml", [f"data.source={tiny_shards}"])
    assert cfg.shape == [16, 256, 256] and cfg.planes == ["sag", "cor", "ax"]
    for plane in cfg.planes:
        obj = build_objective(cfg, plane, load_manifest(str(tiny_shards)))
        assert obj.spec.intensity == "minmax" and obj.spec.spatial == "crop_resize"
        with torch.device("meta"):
            model = obj.build_model()
        assert isinstance(model, OrthoDiffusionBackbone)
        assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS
    out = subprocess.run([sys.executable, "-c", PAPER_STEP, str(tiny_shards)], cwd=root, capture_output=True,
                         text=True, timeout=3600)
    assert out.returncode == 0, out.stderr[-2000:]
    step = json.loads(out.stdout.strip().splitlines()[-1])
    (tmp_path / "paper_step.json").write_text(json.dumps(step))
    print(f"orthodiffusion-knee, one CPU step at batch 1: {step}")
    assert math.isfinite(step["loss"]) and step["changed"]
    assert step["peak_rss_gib"] < 12


def test_attention_is_guided_diffusions_legacy_order_and_runs_on_the_flash_kernel():
    """AttentionBlock = guided-diffusion's QKVAttentionLegacy (written out here), also under the fused
    flash kernel of scaled_dot_product_attention, which refuses the 3-D inputs the block once gave it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pretrain.models.orthodiffusion import AttentionBlock

    torch.manual_seed(0)
    block = AttentionBlock(16, heads=2, groups=4).eval()
    torch.nn.init.normal_(block.proj_out.weight)                   # zero-initialised: make it count
    x = torch.randn(2, 16, 2, 3, 4)
    with torch.no_grad():
        flat = x.reshape(2, 16, -1)
        q, k, v = block.qkv(block.norm(flat)).reshape(2 * 2, 3 * 8, -1).split(8, dim=1)
        scale = 1 / math.sqrt(math.sqrt(8))
        weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
        legacy = flat + block.proj_out(torch.einsum("bts,bcs->bct", weight, v).reshape(2, 16, -1))
        default = block(x)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            flash = block(x)
    assert torch.allclose(default, legacy.reshape(x.shape), atol=1e-5)
    assert torch.allclose(flash, default, atol=1e-5)
