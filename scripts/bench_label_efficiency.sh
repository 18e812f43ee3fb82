#!/usr/bin/env bash
# Label-efficiency benchmark (issue 12), every stage resumable: after an interrupt run the same command
# again (shards skip finished shards, `pretrain run` resumes from its newest checkpoint, the studies
# restore their Ray Tune experiments, features come from the on-disk cache).
#
#   scripts/bench_label_efficiency.sh            # or: make bench-label-efficiency
#
# 1. shards   configs/shards/bench.yaml -> data/shards/bench (2,600 patients; knee `pretrain` pool,
#             labelled `train`, `val`, `test`)
# 2. pretrain configs/pretrain/bench-knee.yaml: three knee plane backbones with `pretrain run` (Ray
#             Train + DeepSpeed) on the unlabelled pool, published to hub/bench/knee-{sag,cor,ax}
# 3. studies  configs/sweeps/label-efficiency-bench.yaml (fractions x seeds) and
#             configs/sweeps/transfer-bench.yaml (knee -> ankle, knee -> shoulder), each a report
#             (report.md + report.html with plots) under runs/study/
#
# Environment: BENCH_ROOT (working folder for data/, hub/, runs/, cache/; default the repository),
# PYTHON (default python3), and extra key=value overrides per stage, split on spaces:
# BENCH_SHARDS_ARGS, BENCH_PRETRAIN_ARGS, BENCH_STUDY_ARGS (both studies), BENCH_LE_ARGS and
# BENCH_TRANSFER_ARGS (one study each) — for reduced runs and tests.
# Stage wall times are appended to runs/bench/label-efficiency/timings.tsv.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
cd "${BENCH_ROOT:-$REPO}"
read -r -a SHARDS_ARGS <<< "${BENCH_SHARDS_ARGS:-}"
read -r -a PRETRAIN_ARGS <<< "${BENCH_PRETRAIN_ARGS:-}"
read -r -a STUDY_ARGS <<< "${BENCH_STUDY_ARGS:-}"
read -r -a LE_ARGS <<< "${BENCH_LE_ARGS:-}"
read -r -a TRANSFER_ARGS <<< "${BENCH_TRANSFER_ARGS:-}"
OUT=runs/bench/label-efficiency
mkdir -p "$OUT"
TIMES="$OUT/timings.tsv"
[ -f "$TIMES" ] || printf 'stage\tseconds\tfinished_utc\n' > "$TIMES"

stage() {  # stage <name> <command...>: run it and append its wall time
  local name=$1 t0
  shift
  echo "== $name"
  t0=$(date +%s)
  "$@"
  printf '%s\t%s\t%s\n' "$name" "$(( $(date +%s) - t0 ))" "$(date -u +%FT%TZ)" >> "$TIMES"
}

stage shards "$PY" -m shards -q build --config "$REPO/configs/shards/bench.yaml" "${SHARDS_ARGS[@]}"
stage pretrain "$PY" -m pretrain run --config "$REPO/configs/pretrain/bench-knee.yaml" "${PRETRAIN_ARGS[@]}"
stage publish "$PY" -m pretrain publish bench-knee --to hub/bench --overwrite
stage label-efficiency "$PY" -m downstream study label-efficiency "${STUDY_ARGS[@]}" "${LE_ARGS[@]}" \
  --space "$REPO/configs/sweeps/label-efficiency-bench.yaml"
stage transfer "$PY" -m downstream study transfer "${STUDY_ARGS[@]}" "${TRANSFER_ARGS[@]}" \
  --space "$REPO/configs/sweeps/transfer-bench.yaml"

echo "== stage wall times (s), this and earlier runs: $TIMES"
cat "$TIMES"
echo "reports: runs/study/label-efficiency-bench/report.html, runs/study/transfer-bench/report.html"
