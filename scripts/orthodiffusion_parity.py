"""Parity of mskfm's OrthoDiffusionBackbone with OrthoDiffusion's own code (which is not in mskfm).

    git clone https://github.com/lt-0123/OrthoDiffusion /tmp/orthodiffusion     # their code, MIT
    python scripts/orthodiffusion_parity.py --code /tmp/orthodiffusion --size small
    python scripts/orthodiffusion_parity.py --code /tmp/orthodiffusion --size published --timesteps 100 \\
        --blocks in_0 mid_2 out_9

Builds their ``create_model(..., 64, 1)`` and ``GaussianDiffusion(timesteps=1000)`` from ``--code``, draws
every parameter from N(0, 0.05^2) (so no zero-initialised layer hides a difference), saves their
checkpoint layout with ``torch.save``, imports it with ``pretrain.importers.import_checkpoint``, loads it
with ``load_backbone``, and compares their ``get_feature(x, t, name=block)`` after
``torch.manual_seed(seed)`` with ``features(x, [t], [block], seed=seed)`` on the same input. ``small`` is
the same network at a 16x64x64 input (attention at resolution 4 = 16x downsampling, as 16 of 256).
Their ``trainer.py`` imports torchvision and tensorboard, which these classes do not use: both are
stubbed. Prints one JSON object (parameter counts, max abs difference per timestep and block).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import types
from pathlib import Path

import torch

from pretrain.importers import import_checkpoint
from pretrain.publish import load_backbone


def their_code(path: str):
    """OrthoDiffusion's GaussianDiffusion and create_model, imported from a checkout at ``path``."""
    for name in ("torchvision", "torch.utils.tensorboard"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["torchvision"].transforms = types.ModuleType("transforms")
    sys.modules["torchvision"].utils = types.ModuleType("utils")
    sys.modules["torch.utils.tensorboard"].SummaryWriter = object
    sys.path.insert(0, path)
    with contextlib.redirect_stdout(sys.stderr):  # their trainer prints at import
        from diffusion_model.trainer import GaussianDiffusion
        from diffusion_model.unet import create_model

    return GaussianDiffusion, create_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--code", required=True, help="a checkout of github.com/lt-0123/OrthoDiffusion")
    p.add_argument("--size", choices=("small", "published"), default="small")
    p.add_argument("--timesteps", type=int, nargs="+", default=[0, 50, 200, 999])
    p.add_argument("--blocks", nargs="+",
                   default=["in_0", "in_4", "in_9", "mid_0", "mid_1", "mid_2", "out_0", "out_5", "out_9"])
    p.add_argument("--seed", type=int, default=123)
    args = p.parse_args()
    GaussianDiffusion, create_model = their_code(args.code)

    image, attention, mult = (256, "16", "") if args.size == "published" else (64, "4", "1,1,2,2,4")
    torch.manual_seed(0)
    unet = create_model(image, 64, 1, channel_mult=mult, attention_resolutions=attention, in_channels=1, out_channels=1)
    theirs = GaussianDiffusion(unet, image_size=image, depth_size=16, timesteps=1000, loss_type="l2").eval()
    with torch.no_grad():
        for param in theirs.denoise_fn.parameters():
            param.normal_(0, 0.05)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model.pt"
        torch.save({"step": 0, "model": theirs.state_dict(), "ema": theirs.state_dict(), "opt": {}}, ckpt)
        shape = [] if args.size == "published" else ["preprocessing.shape=[16,64,64]"]
        import_checkpoint(str(ckpt), "orthodiffusion", "sag", str(Path(tmp) / "imported"), shape)
        ours, _, _ = load_backbone(str(Path(tmp) / "imported"))
    x = torch.rand(1, 1, 16, image, image) * 2 - 1
    rows = []
    with torch.no_grad():
        for t in args.timesteps:
            for block in args.blocks:
                torch.manual_seed(args.seed)
                ref = theirs.get_feature(x, torch.tensor([t]), name=block)
                got = ours.features(x, [t], [block], seed=args.seed)[f"t{t}/{block}"]
                rows.append({"t": t, "block": block, "max_abs_diff": (ref - got).abs().max().item(),
                             "max_abs_feature": ref.abs().max().item()})
    print(json.dumps({"size": args.size, "input": list(x.shape),
                      "parameters_orthodiffusion": sum(q.numel() for q in theirs.denoise_fn.parameters()),
                      "parameters_mskfm": sum(q.numel() for q in ours.parameters()),
                      "max_abs_diff": max(r["max_abs_diff"] for r in rows), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
