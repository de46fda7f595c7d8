#!/usr/bin/env bash
# The official (reference) Cross-D computation has no grouped convolutions, so it cannot
# train MobileNetV2 (depthwise 3x3 layers). Its comparison runs on ResNet-18 instead: plain,
# Cross-D Fourier and Cross-D reference, identical recipe and budget. Fashion-MNIST,
# class-stratified 6,000-image subset, 2 epochs (186 steps), batch 64, AdamW 2e-3, cosine,
# 0.2 warm-up epoch, seed 0. Smaller than the MobileNetV2 arms: a Cross-D ResNet-18 step
# costs about 3x a Cross-D MobileNetV2 step on the CPU (7x7x7 stem kernel, dense 3x3x3 kernels).
# Usage: bash benchmarks/transfer/pretrain_arms_resnet18.sh [OUT_DIR]   (default benchmarks/transfer/runs)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-benchmarks/transfer/runs}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
recipe=(fashion-mnist --arch resnet18 --epochs 2 --limit 6000 --batch-size 64 --lr 2e-3
        --optimizer adamw --weight-decay 0.05 --warmup-epochs 0.2 --seed 0 --print-every 25)
python -m napari_crossd.cli pretrain "${recipe[@]}" --conv crossd --rotation dynamic --rotation-mode reference \
    --out "$out/r18_crossd_reference"
python -m napari_crossd.cli pretrain "${recipe[@]}" --conv plain --out "$out/r18_plain"
python -m napari_crossd.cli pretrain "${recipe[@]}" --conv crossd --rotation dynamic --rotation-mode fourier \
    --out "$out/r18_crossd_fourier"
