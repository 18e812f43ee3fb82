"""Read benchmark: the shard reader vs one NIfTI file per plane loaded with MONAI's LoadImage.

Generates N synthetic studies once, writes them as shards and as NIfTI (.nii.gz, the usual way,
and uncompressed .nii), then reads everything back to float32 tensors in a fresh child process per
method (so peak resident memory is that method's alone). Memory flatness: the shard reader is also
run on the first half of the data; its peak RSS must not grow with the dataset.

    .venv/bin/python scripts/bench_shards.py --studies 300 --out docs/perf/shards.md
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prepare(root: Path, n_patients: int) -> dict:
    from shards.build import BuildConfig, build_shards
    from shards.config import load_config
    from shards.export import export_study
    from shards.reader import iter_samples

    cfg = load_config(BuildConfig, ROOT / "configs/shards/demo.yaml",
                      [f"out={root / 'shards'}", f"synth.n_patients={n_patients}", "synth.kspace.enabled=false",
                       "shard_max_bytes=100000000", "workers=2"])
    manifest = build_shards(cfg, progress=False)
    for sample in iter_samples(root / "shards", None, ("meta", "sag", "cor", "ax"), require=()):
        sample = {k: v for k, v in sample.items() if k in ("__key__", "meta", "sag", "cor", "ax")}
        export_study(sample, root / "nifti", "nifti")
        folder = root / "nii" / sample["__key__"]
        folder.mkdir(parents=True, exist_ok=True)
        for f in (root / "nifti" / sample["__key__"]).glob("*.nii.gz"):
            import nibabel as nib

            nib.save(nib.load(f), folder / f.name.replace(".nii.gz", ".nii"))
    return manifest


def read_shards(root: Path, limit: int | None) -> dict:
    import torch

    from shards.reader import ShardReader

    reader = ShardReader(root / "shards", None, ("sag", "cor", "ax"), rank=0, world_size=1,
                         require=(), epoch_length=limit)
    n = nbytes = 0
    for sample in reader:
        for p in ("sag", "cor", "ax"):
            if p in sample:
                t = torch.from_numpy(sample[p]).float()
                nbytes += t.numel() * 4
        n += 1
    return {"studies": n, "decoded_bytes": nbytes, "disk_bytes": reader.bytes_read}


def read_nifti(root: Path, pattern: str) -> dict:
    from monai.transforms import LoadImage

    load = LoadImage(image_only=True, dtype="float32")
    n = nbytes = disk = 0
    for folder in sorted(p for p in (root / pattern).iterdir() if p.is_dir()):
        for f in sorted(f for f in folder.iterdir() if f.name.split(".")[0] in ("sag", "cor", "ax")):
            t = load(str(f)).float()
            nbytes += t.numel() * 4
            disk += f.stat().st_size
        n += 1
    return {"studies": n, "decoded_bytes": nbytes, "disk_bytes": disk}


def child(method: str, root: Path, limit: int | None) -> None:
    import monai.transforms  # noqa: F401  (imports are not part of the timing)
    import torch  # noqa: F401

    import shards.reader  # noqa: F401

    t0 = time.perf_counter()
    if method == "shards":
        out = read_shards(root, limit)
    else:
        out = read_nifti(root, method)
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def run_child(method: str, root: Path, limit: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--root", str(root)]
    if limit:
        cmd += ["--limit", str(limit)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=300, help="approximate number of studies (patients)")
    ap.add_argument("--out", default=None, help="markdown file for the figures")
    ap.add_argument("--child", default=None)
    ap.add_argument("--root", default=None)
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()
    if args.child:
        return child(args.child, Path(args.root), args.limit)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.time()
        manifest = prepare(root, args.studies)
        n = manifest["stats"]["n_samples"]
        print(f"prepared {n} studies in {time.time() - t0:.0f} s", flush=True)
        results = {"shards": run_child("shards", root), "nifti": run_child("nifti", root),
                   "nii": run_child("nii", root), "shards_half": run_child("shards", root, n // 2)}
    rows = []
    for name, label in (("shards", "shard reader (WebDataset tar, .npy)"),
                        ("nifti", "MONAI LoadImage, one .nii.gz per plane"),
                        ("nii", "MONAI LoadImage, one .nii per plane (uncompressed)"),
                        ("shards_half", "shard reader, first half of the data")):
        r = results[name]
        rows.append(f"| {label} | {r['studies']} | {r['studies'] / r['seconds']:.1f} | "
                    f"{r['decoded_bytes'] / 1e6 / r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |")
    s, g, u = (results[k]["studies"] / results[k]["seconds"] for k in ("shards", "nifti", "nii"))
    md = "\n".join([
        f"Read benchmark: {n} synthetic studies (3 planes of 16x64x64 float32), decoded to float32 "
        "tensors, one fresh process per method, 2-core machine.", "",
        "| method | studies | studies/s | MB/s (decoded) | peak RSS (MB) |", "|---|---|---|---|---|", *rows, "",
        f"Shard reader vs .nii.gz: **{s / g:.1f}x**; vs uncompressed .nii: **{s / u:.1f}x**. "
        f"Peak RSS of the shard reader on all {n} studies vs half of them: "
        f"{results['shards']['peak_rss_mb']:.0f} MB vs {results['shards_half']['peak_rss_mb']:.0f} MB "
        "(flat: it streams one sample at a time).", "",
        f"Command: `.venv/bin/python scripts/bench_shards.py --studies {args.studies}`"])
    print(md)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(md + "\n")


if __name__ == "__main__":
    main()
