"""Volumes on disk for the command line: NIfTI, TIFF and NumPy in, outputs on the same grid out.

Convention:
    In memory a volume is (Z, Y, X): a NIfTI image's data (i, j, k) is transposed to
    (k, j, i) without reorienting, so that writing back with the source's affine and header
    lands every voxel exactly where it came from; ``spacing`` is the header's zooms in the
    same (Z, Y, X) order. TIFF and ``.npy`` stacks are (Z, Y, X) already and are
    memory-mapped when their layout allows, so a volume larger than RAM is read in tiles.
    Channel stacks are written channels first (C, Z, Y, X) to ``.npy`` and ``.tif``, and as
    4D NIfTI with channels on the fourth axis (NIfTI's own convention) and the source's
    affine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import tifffile

from .atomic import atomic_path

__all__ = ["SUFFIXES", "Volume", "read_volume", "volume_suffix", "write_volume"]

SUFFIXES = (".nii", ".nii.gz", ".tif", ".tiff", ".npy")


def volume_suffix(path: Path) -> str:
    """The volume file type of ``path`` (one of :data:`SUFFIXES`); ValueError for anything else."""
    name = path.name.lower()
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise ValueError(f"{path.name}: unsupported file type; expected one of {', '.join(SUFFIXES)}.")


@dataclass
class Volume:
    """A (Z, Y, X) array with where it came from."""

    data: np.ndarray
    spacing: tuple[float, float, float] | None
    path: Path
    nifti: nib.Nifti1Image | None = None


def read_volume(path: str | Path, spacing: tuple[float, float, float] | None = None) -> Volume:
    """Read a 3D volume (see the module's Convention).

    Args:
        path: ``.nii``, ``.nii.gz``, ``.tif``/``.tiff`` or ``.npy``.
        spacing: voxel size (Z, Y, X), overriding the file's (NIfTI zooms).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unsupported type, unreadable file, or not a single-channel 3D volume.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No such file: {path}")
    suffix = volume_suffix(path)
    image = None
    try:
        if suffix in (".nii", ".nii.gz"):
            image = nib.load(path)
            data = np.asanyarray(image.dataobj)
            if data.ndim == 4 and data.shape[3] == 1:
                data = data[..., 0]
            if data.ndim != 3:
                raise ValueError(f"{path.name}: expected a 3D image, got shape {data.shape}.")
            data = data.transpose(2, 1, 0)
            spacing = spacing or tuple(float(z) for z in image.header.get_zooms()[:3][::-1])
        elif suffix == ".npy":
            data = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            try:
                data = tifffile.memmap(path, mode="r")
            except ValueError:  # compressed or tiled: not memory-mappable
                data = tifffile.imread(path)
    except (OSError, nib.filebasedimages.ImageFileError, EOFError) as err:
        raise ValueError(f"Cannot read {path.name}: {err}") from None
    if data.ndim != 3:
        raise ValueError(f"{path.name}: expected a 3D volume (Z, Y, X), got shape {data.shape}.")
    return Volume(data, spacing, path, image)


def _nifti_like(data: np.ndarray, like: Volume | None) -> nib.Nifti1Image:
    """``data`` (Z, Y, X) or (C, Z, Y, X) as a NIfTI image with ``like``'s affine and header, or its spacing."""
    spatial = data.transpose(2, 1, 0) if data.ndim == 3 else data.transpose(3, 2, 1, 0)
    if like is None or like.nifti is None:
        zooms = (like.spacing if like is not None and like.spacing else (1.0, 1.0, 1.0))[::-1]
        return nib.Nifti1Image(spatial, np.diag([*zooms, 1.0]))
    header = like.nifti.header.copy()
    header.set_data_dtype(spatial.dtype)
    image = nib.Nifti1Image(spatial, like.nifti.affine, header)
    image.set_qform(like.nifti.get_qform(), int(like.nifti.header["qform_code"]))
    image.set_sform(like.nifti.get_sform(), int(like.nifti.header["sform_code"]))
    # Data are written as they are: no scaling inherited from the source image.
    image.header.set_slope_inter(1.0, 0.0)
    return image


def write_volume(path: str | Path, data: np.ndarray, like: Volume | None = None) -> Path:
    """Write ``data`` ((Z, Y, X) or channels first (C, Z, Y, X)) on the grid of ``like``.

    The file appears whole or not at all (:func:`napari_crossd.io.atomic.atomic_path`): a
    failure never leaves a half-written file or destroys an earlier one.

    Returns:
        The path written.
    """
    path = Path(path)
    suffix = volume_suffix(path)
    data = np.asarray(data)
    if data.ndim not in (3, 4):
        raise ValueError(f"Expected a (Z, Y, X) or (C, Z, Y, X) array to write, got shape {data.shape}.")
    with atomic_path(path) as partial:
        if suffix in (".nii", ".nii.gz"):
            nib.save(_nifti_like(data, like), partial)
        elif suffix == ".npy":
            with open(partial, "wb") as handle:
                np.save(handle, data)
        else:
            tifffile.imwrite(partial, data)
    return path
