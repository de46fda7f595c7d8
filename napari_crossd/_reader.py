"""napari reader for NIfTI volumes (.nii, .nii.gz).

The volume is reoriented to the closest canonical (RAS+) orientation and its axes
reversed to napari's (Z, Y, X) = (S, A, R) order
(:func:`napari_crossd.io.grids.canonical_layer`), so that the last two axes show axial
slices. Voxel spacing (the canonical zooms) becomes the layer's ``scale`` and
the voxel origin its ``translate`` (world coordinates in mm); the file's own affine and
shape are kept in ``metadata["nifti"]`` so that :mod:`napari_crossd._writer` writes
results back on the source grid, voxel for voxel. Importing this module does not import
torch (napari imports it to open a file).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np

from .io.grids import canonical_layer

__all__ = ["napari_get_reader", "nifti_layer_data", "read_nifti"]

_SUFFIXES = (".nii", ".nii.gz")
# An integer volume with one of these in its file name opens as a Labels layer.
_LABEL_HINT = re.compile(r"(label|seg|mask|parc|aseg|tissue|annot)", re.IGNORECASE)


def _is_nifti(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and str(path).lower().endswith(_SUFFIXES)


def napari_get_reader(path):
    """The reader for ``path`` (a str or a list of str), or None if these are not NIfTI files."""
    paths = path if isinstance(path, (list, tuple)) else [path]
    if not paths or not all(_is_nifti(p) for p in paths):
        return None
    return read_nifti


def _layer_name(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def nifti_layer_data(path: str | os.PathLike, layer_type: str | None = None) -> tuple:
    """One NIfTI file as napari layer data ``(data, kwargs, layer_type)``.

    Args:
        path: a .nii or .nii.gz file.
        layer_type: ``"image"`` or ``"labels"``; by default labels for an integer volume
            whose file name says label/seg/mask/parc/tissue/annot.

    Returns:
        ``data`` (Z, Y, X) (a 4D file keeps its 4th axis first: (T, Z, Y, X)), kwargs with
        ``name``, ``scale``, ``translate`` and ``metadata["nifti"]`` (see the module docstring).
    """
    path = Path(path)
    image = nib.load(str(path))
    if len(image.shape) not in (3, 4):
        raise ValueError(f"{path.name}: expected a 3D or 4D NIfTI volume; got shape {image.shape}")
    data, grid = canonical_layer(image, path)
    scale, translate = grid["scale"], grid["translate"]
    if layer_type is None:
        integer = np.issubdtype(data.dtype, np.integer)
        layer_type = "labels" if integer and _LABEL_HINT.search(path.name) else "image"
    if layer_type == "labels" and not np.issubdtype(data.dtype, np.integer):
        data = np.rint(data).astype(np.int32)
    if data.ndim == 4:  # the fourth axis is not spatial: one step per index
        scale, translate = (1.0, *scale), (0.0, *translate)
    return data, {**grid, "name": _layer_name(path), "scale": scale, "translate": translate}, layer_type


def read_nifti(path) -> list[tuple]:
    """Read one or more NIfTI files as napari layer data tuples."""
    paths = path if isinstance(path, (list, tuple)) else [path]
    return [nifti_layer_data(p) for p in paths]
