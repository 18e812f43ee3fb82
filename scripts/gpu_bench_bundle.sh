#!/usr/bin/env bash
# The GPU benchmark (scripts/bench_pretrain.py --gpu) on a bare GPU machine that has torch, timm and
# torchvision but no network. Importing the model (pretrain.models) also needs diffusers, MONAI,
# OmegaConf (shards.config), fastMRI (the registry imports the reconstruction backbones, and fastMRI
# imports h5py and pandas) and their dependencies that torch/timm/torchvision do not bring; about
# 30 MB of wheels. Download them here, carry the folder:
#
#   scripts/gpu_bench_bundle.sh download [gpu_bundle]       # here (PYTHON_VERSION=3.11 by default)
#   scripts/gpu_bench_bundle.sh run [gpu_bundle] -- --steps 20 --warmup 5 --out docs/perf/pretrain-gpu.md
#                                                           # there: unpacks the wheels, runs the benchmark
#
# No pip on the GPU machine: wheels are zip files, unpacked with python -m zipfile into <folder>/site.
# tests/test_scale.py runs the smoke test with every other third-party import blocked, which checks
# that this list (with torch's, timm's and torchvision's own requirements) is all the model needs.
set -euo pipefail
# pinned as in constraints.txt
PACKAGES=(diffusers==0.42.1 monai==1.6.1 omegaconf==2.4.0 antlr4-python3-runtime==4.13.2
          regex==2026.11.15 importlib_metadata==10.2.0 zipp==4.1.2
          fastmri==0.3.0 h5py==3.16.0 pandas==3.1.1 python-dateutil==2.9.0.post0 six==1.17.0
          requests==2.34.2 urllib3==2.8.0 idna==3.20 certifi==2026.10.18 charset-normalizer==3.5.2)
cmd=${1:?usage: $0 download|run [folder] [-- benchmark args]}
dir=${2:-gpu_bundle}
shift $(( $# >= 2 ? 2 : 1 ))
[[ ${1:-} == "--" ]] && shift
case $cmd in
  download)
    python -m pip download --no-deps --only-binary=:all: --implementation cp \
      --python-version "${PYTHON_VERSION:-3.11}" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
      -d "$dir" "${PACKAGES[@]}"
    ls -la "$dir" ;;
  run)
    site=$(cd "$dir" && pwd)/site
    mkdir -p "$site"
    for w in "$dir"/*.whl; do python -m zipfile -e "$w" "$site"; done
    PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" python scripts/bench_pretrain.py --gpu "$@" ;;
  *) echo "unknown command '$cmd' (download or run)" >&2; exit 2 ;;
esac
