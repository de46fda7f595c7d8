#!/usr/bin/env bash
# The MobileNetV2 2D pretraining arms of the transfer study, identical budget and recipe:
# plain convolutions, and Cross-D Conv (exact Fourier rotation, dynamic). (The official
# reference computation has no grouped convolutions, so it cannot train MobileNetV2's depthwise
# layers: its arm is in pretrain_arms_resnet18.sh.) Fashion-MNIST
# (apt-get install dataset-fashion-mnist), a class-stratified 12,000-image subset,
# 3 epochs (561 steps), batch 64, AdamW 2e-3, cosine, 0.2 warm-up epoch. One seed (0).
# Sized for a shared 2-core CPU (4-10 min per arm there); raise --limit and --epochs on real hardware.
# One thread: on a CPU shared with other jobs, two OpenMP threads ran a step 10x slower than one.
# Usage: bash benchmarks/transfer/pretrain_arms.sh [OUT_DIR]   (default benchmarks/transfer/runs)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-benchmarks/transfer/runs}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
recipe=(fashion-mnist --arch mobilenet_v2 --epochs 3 --limit 12000 --batch-size 64 --lr 2e-3
        --optimizer adamw --weight-decay 0.05 --warmup-epochs 0.2 --seed 0 --print-every 25)
python -m napari_crossd.cli pretrain "${recipe[@]}" --conv crossd --rotation dynamic --rotation-mode fourier \
    --out "$out/crossd_fourier"
python -m napari_crossd.cli pretrain "${recipe[@]}" --conv plain --out "$out/plain"
