#!/usr/bin/env bash
# The 2D pretraining arms of the transfer study, on Fashion-MNIST (apt-get install
# dataset-fashion-mnist), one seed (0). Within an architecture every arm has the same recipe
# and budget: batch 64, AdamW 2e-3, weight decay 0.05, cosine, 0.2 warm-up epoch.
# - MobileNetV2: class-stratified 12,000-image subset, 3 epochs (561 steps); plain convolutions
#   and Cross-D Conv (exact Fourier rotation, dynamic). The official reference computation has
#   no grouped convolutions, so it cannot train MobileNetV2's depthwise layers; it runs on:
# - ResNet-18: 6,000-image subset, 2 epochs (186 steps), smaller because a Cross-D ResNet-18
#   step costs about 3x a Cross-D MobileNetV2 step on the CPU (7x7x7 stem, dense 3x3x3 kernels);
#   plain, Cross-D Fourier and Cross-D reference.
# Sized for a shared 2-core CPU (4-15 min per arm there); raise --limit and --epochs on real hardware.
# One thread: on a CPU shared with other jobs, two OpenMP threads ran a step 10x slower than one.
# An arm whose last epoch is already saved is skipped.
# Usage: bash benchmarks/transfer/pretrain_arms.sh [OUT_DIR]   (default benchmarks/transfer/runs)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-benchmarks/transfer/runs}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# pretrain NAME ARCH EPOCHS LIMIT CONV_ARGS...
pretrain() {
    local name=$1 arch=$2 epochs=$3 limit=$4
    shift 4
    if [[ -f $out/$name/$(printf 'epoch_%04d.pt' "$epochs") ]]; then
        return
    fi
    python -m napari_crossd.cli pretrain fashion-mnist --arch "$arch" --epochs "$epochs" --limit "$limit" \
        --batch-size 64 --lr 2e-3 --optimizer adamw --weight-decay 0.05 --warmup-epochs 0.2 --seed 0 \
        --print-every 25 "$@" --out "$out/$name"
}

pretrain crossd_fourier mobilenet_v2 3 12000 --conv crossd --rotation dynamic --rotation-mode fourier
pretrain plain mobilenet_v2 3 12000 --conv plain
pretrain r18_crossd_reference resnet18 2 6000 --conv crossd --rotation dynamic --rotation-mode reference
pretrain r18_plain resnet18 2 6000 --conv plain
pretrain r18_crossd_fourier resnet18 2 6000 --conv crossd --rotation dynamic --rotation-mode fourier
