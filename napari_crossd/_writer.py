"""napari writers: Image and Labels layers to NIfTI, back on the source grid.

A layer read by :mod:`napari_crossd._reader` (or made by this plugin's widgets from such
a layer) carries ``metadata["nifti"]``: its data, in (Z, Y, X) canonical order, is
turned back into the file's own voxel order and saved with the file's own affine, so a
segmentation overlays the source file voxel for voxel in any NIfTI viewer. Other layers
get an affine from their ``scale`` and ``translate`` (RAS+, axes (X, Y, Z) = napari's
reversed). Files appear whole or not at all (:mod:`napari_crossd.io.atomic`).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from .io.atomic import atomic_path
from .io.grids import to_source_grid

__all__ = ["write_image", "write_labels", "write_nifti"]


def _output_path(path: str) -> Path:
    path = Path(path)
    if not str(path).lower().endswith((".nii", ".nii.gz")):
        path = path.with_name(path.name + ".nii.gz")
    return path


def write_nifti(path: str, data, meta: dict) -> list[str]:
    """Write one layer to ``path`` (``.nii.gz`` appended when the suffix is not NIfTI); the paths written."""
    out = _output_path(path)
    image = to_source_grid(data, meta)
    # Saving over an earlier segmentation must not destroy it if the write fails half way.
    with atomic_path(out) as partial:
        nib.save(image, str(partial))
    return [str(out)]


def write_labels(path: str, data, meta: dict) -> list[str]:
    """npe2 single-layer writer for Labels layers."""
    return write_nifti(path, np.asarray(data), meta)


def write_image(path: str, data, meta: dict) -> list[str]:
    """npe2 single-layer writer for Image layers (grey volumes; RGB layers are refused)."""
    if meta.get("rgb"):
        raise ValueError("NIfTI output takes grey volumes; this is an RGB layer (e.g. the PCA view of features)")
    return write_nifti(path, np.asarray(data), meta)
