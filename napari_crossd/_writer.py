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

import numpy as np

from .io.atomic import atomic_path

__all__ = ["to_source_grid", "write_image", "write_labels", "write_nifti"]


def _output_path(path: str) -> Path:
    path = Path(path)
    if not str(path).lower().endswith((".nii", ".nii.gz")):
        path = path.with_name(path.name + ".nii.gz")
    return path


def to_source_grid(data: np.ndarray, meta: dict):
    """``data`` (Z, Y, X) or (T, Z, Y, X) in napari's order as a nibabel image on its source grid."""
    import nibabel as nib
    from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

    data = np.asarray(data)
    if data.ndim not in (3, 4):
        raise ValueError(f"NIfTI output needs a 3D (Z, Y, X) or 4D (T, Z, Y, X) layer; got shape {data.shape}")
    voxels = np.swapaxes(data, -1, -3)  # (.., X, Y, Z): canonical RAS voxel order
    if voxels.ndim == 4:
        voxels = np.moveaxis(voxels, 0, 3)
    nifti = (meta or {}).get("metadata", {}).get("nifti")
    if nifti is not None:
        affine = np.asarray(nifti["affine"], dtype=float)
        shape = tuple(nifti["shape"])
        # The reader applied ornt_transform(source -> RAS); apply its inverse.
        back = ornt_transform(io_orientation(np.asarray(nifti["canonical_affine"])), io_orientation(affine))
        voxels = apply_orientation(voxels, back)
        if tuple(voxels.shape[:3]) != shape:
            raise ValueError(
                f"the layer's data {data.shape} does not match its source grid {shape[::-1]} (Z, Y, X): "
                "it was resized or cropped after reading"
            )
    else:
        scale = np.asarray(meta.get("scale", (1.0,) * data.ndim), dtype=float)[-3:]
        translate = np.asarray(meta.get("translate", (0.0,) * data.ndim), dtype=float)[-3:]
        affine = np.diag([*scale[::-1], 1.0])
        affine[:3, 3] = translate[::-1]
    if voxels.dtype == np.bool_:
        voxels = voxels.astype(np.uint8)
    if voxels.dtype == np.float16:
        voxels = voxels.astype(np.float32)
    if voxels.dtype == np.int64 or voxels.dtype == np.uint64:
        peak = int(voxels.max(initial=0))
        voxels = voxels.astype(np.uint8 if 0 <= int(voxels.min(initial=0)) and peak < 256 else np.int32)
    image = nib.Nifti1Image(np.ascontiguousarray(voxels), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return image


def write_nifti(path: str, data, meta: dict) -> list[str]:
    """Write one layer to ``path`` (``.nii.gz`` appended when the suffix is not NIfTI); the paths written."""
    import nibabel as nib

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
