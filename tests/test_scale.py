"""Paper scale: the GPU benchmark's CPU smoke test on a simulated bare torch machine."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A bare GPU machine: the standard library, torch, timm and torchvision with their own requirements
# (timm's and torchvision's listed here: they are not installed on the test machine), the wheels of
# scripts/gpu_bench_bundle.sh, and this checkout. Every other import fails as it would there.
BARE = r"""
import importlib.machinery, re, runpy, sys
from importlib.metadata import PackageNotFoundError, packages_distributions, requires

norm = lambda d: re.sub(r"[-_.]+", "-", d).lower()
allowed = {norm(d) for d in sys.argv[1].split(",")}                # the image, with its requirements
todo = list(allowed)
while todo:
    try:
        reqs = requires(todo.pop()) or []
    except PackageNotFoundError:
        continue
    for r in reqs:
        name = norm(re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0])
        if "extra ==" not in r and name not in allowed:
            allowed.add(name)
            todo.append(name)
allowed |= {norm(d) for d in sys.argv[2].split(",")}               # the bundle's wheels, without theirs
modules = {m for m, ds in packages_distributions().items() if any(norm(d) in allowed for d in ds)}
modules |= {"pretrain", "shards", "gpu_bench"}

find = importlib.machinery.PathFinder.find_spec

def bare_find(cls, name, path=None, target=None):
    top = name.partition(".")[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names or top in modules:
        return find(name, path, target)
    return None  # not installed

importlib.machinery.PathFinder.find_spec = classmethod(bare_find)
sys.argv = ["scripts/bench_pretrain.py", *sys.argv[3:]]
runpy.run_path("scripts/bench_pretrain.py", run_name="__main__")
"""
IMAGE = ["torch", "timm", "torchvision", "pyyaml", "huggingface_hub", "safetensors", "numpy", "pillow"]


def bundle_packages() -> list[str]:
    text = (ROOT / "scripts" / "gpu_bench_bundle.sh").read_text()
    block = re.search(r"PACKAGES=\((.*?)\)", text, re.S).group(1)
    return [p.split("==")[0] for p in block.split()]


def test_gpu_bench_smoke_on_a_bare_torch_machine(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--gpu", "--device", "cpu", "--tiny", "--variants", "fp32,bf16-flash", "--steps", "1", "--warmup", "1",
            "--batch", "1", "--loader-workers", "0", "--json", str(out)]
    proc = subprocess.run([sys.executable, "-c", BARE, ",".join(IMAGE), ",".join(bundle_packages()), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["variant"] for r in result["rows"]] == ["fp32", "bf16-flash"]
    for r in result["rows"]:
        assert r["samples_per_s"] > 0 and r["tflop_per_step"] > 0 and 0 <= r["data_wait_frac"] < 1
        assert r["voxels_per_s"] == r["samples_per_s"] * 8 * 32 * 32
    assert not {"ray", "deepspeed"} & {d.lower() for d in result["imports"]}
    assert "| bf16-flash |" in proc.stdout
