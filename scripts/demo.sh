#!/usr/bin/env bash
# The main job on embedded defaults, end to end (called by `make demo`, console scripts on PATH).
set -euo pipefail
SHARDS=data/shards/demo

echo "== 1/4 synthesize: a few example studies as NIfTI + previews (runs/demo/synth-preview)"
shards -q synth --config configs/shards/demo.yaml --out runs/demo/synth-preview --n 3

echo "== 2/4 build shards (resumable; reruns skip finished shards)"
python scripts/demo_stale.py --shards configs/shards/demo.yaml --out "$SHARDS" --pretrain configs/pretrain/demo-knee.yaml
shards -q build --config configs/shards/demo.yaml out="$SHARDS"

echo "== 3/4 verify shards against the manifest (sizes + sha256)"
shards verify "$SHARDS"

echo "== 4/4 dataset summary"
shards info "$SHARDS"

echo "== pretrain: three knee plane backbones on a local Ray, two DeepSpeed workers (a rerun resumes)"
pretrain run --config configs/pretrain/demo-knee.yaml data.source="$SHARDS"

echo "== publish: consolidate ZeRO checkpoints (EMA weights) into hub/knee-{sag,cor,ax}"
pretrain publish demo-knee --to hub --overwrite

echo "== published backbones"
for plane in sag cor ax; do
  echo "  hub/knee-$plane: $(ls hub/knee-$plane | tr '\n' ' ')"
done

echo "== downstream: knee diagnosis (8 labels, 3 planes) on the demo backbones in hub/, with baselines"
downstream finetune --task knee-dx --run-dir runs/finetune/demo-knee-dx
python scripts/demo_reading.py runs/finetune/demo-knee-dx --label effusion
