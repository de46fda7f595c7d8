"""Voxel grids of NIfTI volumes: napari's canonical view of a file, and outputs back on its grid.

Convention:
    napari shows a NIfTI file reoriented to the closest canonical (RAS+) orientation with its
    axes reversed to (Z, Y, X) = (S, A, R), so that the last two axes are axial slices; the
    layer's ``scale`` is the canonical zooms and its ``translate`` the canonical origin (mm),
    both in (Z, Y, X) order. ``metadata["nifti"]`` (:func:`canonical_layer`) keeps the file's own
    affine, shape and orientation: :func:`to_source_grid` turns a (Z, Y, X) layer back into
    the file's voxel order and affine, so results overlay the source voxel for voxel.
    :func:`crop_grid` and :func:`strided_grid` describe the grid of a cut or of a strided
    output of a volume in the same terms.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

from .volumes import Volume

__all__ = ["canonical_layer", "canonical_zyx", "crop_grid", "strided_grid", "to_source_grid"]


def canonical_zyx(image: nib.Nifti1Image) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """A NIfTI image reoriented for viewing: ``(data, spacing, canonical affine)``.

    Unlike :func:`napari_crossd.io.read_volume` (which keeps the file's own grid), the image is
    reoriented as the module's Convention says. A 4D image keeps its fourth axis first:
    (T, Z, Y, X). ``spacing`` is the canonical zooms in (Z, Y, X) order.
    """
    canonical = nib.as_closest_canonical(image)
    data = np.asanyarray(canonical.dataobj)
    if data.ndim not in (3, 4):
        raise ValueError(f"Expected a 3D or 4D NIfTI image; got shape {data.shape}.")
    if data.ndim == 4:
        data = np.moveaxis(data, 3, 0)
    data = np.ascontiguousarray(np.swapaxes(data, -1, -3))
    zooms = canonical.header.get_zooms()[:3]
    return data, tuple(float(z) for z in zooms[::-1]), np.asarray(canonical.affine, dtype=float)


def canonical_layer(image: nib.Nifti1Image, path: str | Path) -> tuple[np.ndarray, dict]:
    """``image`` (read from ``path``) as napari shows it: the :func:`canonical_zyx` data, and
    the grid part of the layer's kwargs: ``scale``, ``translate`` and ``metadata["nifti"]``
    (three spatial axes; see the Convention)."""
    data, spacing, canonical_affine = canonical_zyx(image)
    nifti = {
        "path": str(path),
        "affine": np.asarray(image.affine, dtype=float),
        "canonical_affine": canonical_affine,
        "shape": tuple(int(n) for n in image.shape[:3]),
        "axcodes": "".join(nib.aff2axcodes(image.affine)),
        "dtype": str(image.get_data_dtype()),
    }
    translate = tuple(float(t) for t in canonical_affine[:3, 3][::-1])
    return data, {"scale": spacing, "translate": translate, "metadata": {"nifti": nifti}}


def _voxel_shift(affine: np.ndarray, start) -> np.ndarray:
    """``affine`` of the grid whose voxel 0 is voxel ``start`` of ``affine``'s grid."""
    shift = np.eye(4)
    shift[:3, 3] = start
    return np.asarray(affine, dtype=float) @ shift


def crop_grid(grid: dict, zyx: tuple[slice, slice, slice]) -> dict:
    """:func:`canonical_layer`'s grid for the (Z, Y, X) cut ``zyx`` (step 1) of that layer's data.

    The cut is a box in the source file too: its ``metadata["nifti"]`` is that box's source
    grid, so :func:`to_source_grid` writes the cut in the file's voxel order.
    """
    nifti = dict(grid["metadata"]["nifti"])
    affine, shape = np.asarray(nifti["affine"], dtype=float), tuple(nifti["shape"])
    orientation = io_orientation(affine)  # source axis -> (canonical x/y/z axis, flip)
    canonical_shape = [0, 0, 0]
    for axis, (target, _) in enumerate(orientation):
        canonical_shape[int(target)] = shape[axis]
    # (start, stop) per canonical (X, Y, Z) axis: zyx reversed.
    bounds = [cut.indices(n)[:2] for cut, n in zip(zyx[::-1], canonical_shape, strict=True)]
    source = []
    for axis, (target, flip) in enumerate(orientation):
        start, stop = bounds[int(target)]
        source.append((start, stop) if flip > 0 else (shape[axis] - stop, shape[axis] - start))
    nifti["affine"] = _voxel_shift(affine, [start for start, _ in source])
    nifti["canonical_affine"] = _voxel_shift(nifti["canonical_affine"], [start for start, _ in bounds])
    nifti["shape"] = tuple(stop - start for start, stop in source)
    translate = nifti["canonical_affine"][:3, 3][::-1]
    return {**grid, "translate": tuple(float(t) for t in translate), "metadata": {**grid["metadata"], "nifti": nifti}}


def strided_grid(volume: Volume, stride: int) -> Volume:
    """The grid of one voxel per ``stride``-cube of ``volume`` (read by
    :func:`napari_crossd.io.read_volume`), each voxel at its cube's centre; ``data`` is kept."""
    spacing = tuple(s * stride for s in volume.spacing) if volume.spacing else None
    if volume.nifti is None:
        return Volume(volume.data, spacing, volume.path)
    scaled = volume.nifti.affine @ np.diag([stride, stride, stride, 1.0])
    scaled[:3, 3] = volume.nifti.affine[:3, :3] @ np.full(3, (stride - 1) / 2) + volume.nifti.affine[:3, 3]
    return Volume(volume.data, spacing, volume.path, nib.Nifti1Image(np.zeros((1, 1, 1), np.uint8), scaled))


def _storable(voxels: np.ndarray) -> np.ndarray:
    """``voxels`` in a dtype NIfTI viewers read: bool as uint8, float16 as float32, 64-bit
    integers as uint8 when they fit, else int32."""
    if voxels.dtype == np.bool_:
        return voxels.astype(np.uint8)
    if voxels.dtype == np.float16:
        return voxels.astype(np.float32)
    if voxels.dtype in (np.int64, np.uint64):
        fits = 0 <= int(voxels.min(initial=0)) and int(voxels.max(initial=0)) < 256
        return voxels.astype(np.uint8 if fits else np.int32)
    return voxels


def to_source_grid(data: np.ndarray, meta: dict) -> nib.Nifti1Image:
    """``data`` (Z, Y, X) or (T, Z, Y, X) in napari's order as a nibabel image on its source grid.

    ``meta`` is the layer's (``metadata["nifti"]`` from :func:`canonical_layer`, or else its
    ``scale`` and ``translate`` give an axis-aligned RAS+ affine).
    """
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
        # canonical_zyx applied ornt_transform(source -> RAS); apply its inverse.
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
    image = nib.Nifti1Image(np.ascontiguousarray(_storable(voxels)), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return image
