"""Real volumes that install offline from the package registries, and the tasks made of them.

Where their files are and their voxel spacing: :mod:`napari_crossd.io.samples`. Simulated
strokes and Dice, to score a segmentation of these tasks: :mod:`napari_crossd.evaluation`.

Convention:
    Volumes are (Z, Y, X) numpy arrays: NIfTI data is reoriented to the closest canonical
    (RAS+) orientation and transposed so that axis 0 runs inferior -> superior (axial
    slices), axis 1 posterior -> anterior and axis 2 left -> right; ``spacing`` follows
    the same order. Label volumes use 0 for "not annotated" (strokes) or hold a class
    1..N at every voxel (ground truth).
"""

from __future__ import annotations

import plistlib
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import tifffile
from scipy import ndimage
from skimage.segmentation import find_boundaries

from .io.grids import canonical_zyx
from .io.samples import HEAD_CT_PATH, NUCLEI_SPACING, mni152_path, nuclei_paths

__all__ = [
    "MNI_CLASSES",
    "NUCLEI_BLOCK",
    "Sample",
    "load_head_ct",
    "load_mni152",
    "load_mni152_deep_grey",
    "load_nuclei",
    "load_nuclei_foreground",
    "load_nuclei_parts",
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
    paths = nuclei_paths()
    image, labels = tifffile.imread(paths["image"]), tifffile.imread(paths["labels"])
    affine = np.diag([*NUCLEI_SPACING[::-1], 1.0])
    return Sample(image, NUCLEI_SPACING, affine, labels, ("nuclei",), {"name": "confocal nuclei"})


def load_mni152_deep_grey(depth_mm: float = 20.0) -> Sample:
    """The MNI152 T1 with grey matter split by depth: the same tissue in different places.

    Labels (every voxel): 1 the rest (background, CSF, white matter), 2 outer grey matter,
    3 deep grey matter: grey-matter voxels of :func:`load_mni152` more than ``depth_mm``
    from the brain's outer surface (Euclidean distance to the outside of the hole-filled
    brain mask ``T1 > 0``). By depth, not anatomy: "deep" holds the basal ganglia and
    thalamus and also the deepest cortex (insula, cingulate, medial temporal lobe).
    """
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


def _inv3_members(path: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    """The files ``names`` of an InVesalius project (a tar.gz with one folder), read in memory."""
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
