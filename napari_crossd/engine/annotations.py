"""Painted strokes as training data: the one label rule of the widgets, the CLI and the engine.

Convention:
    A label volume has the image's shape (Z, Y, X) and integer values: 0 means "not
    annotated", 1..N are classes. Classes need not all be painted (labels {1, 3} train a
    model that never predicts class 2), but at least two must be, so that there is
    something to tell apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Annotations", "annotations_of_volumes"]

# Held-out groups for choosing settings: the painted planes along the axis with fewest of
# them, when there are at most this many (strokes on slices); otherwise 8^3 blocks.
_MAX_PLANE_GROUPS = 64
_BLOCK = 8


@dataclass(frozen=True)
class Annotations:
    """The annotated voxels of a label volume.

    Attributes:
        coords: ``(P, 3)`` int64 voxel coordinates (Z, Y, X).
        classes: ``(P,)`` int64 classes, 1..N as painted.
        shape: the label volume's shape.
        num_classes: N, the highest class a label may have.
    """

    coords: np.ndarray
    classes: np.ndarray
    shape: tuple[int, int, int]
    num_classes: int

    @classmethod
    def from_labels(
        cls, labels, shape: tuple[int, ...] | None = None, num_classes: int | None = None, min_classes: int = 2
    ) -> Annotations:
        """Check ``labels`` and collect its annotated voxels.

        Args:
            labels: (Z, Y, X) integer array (numpy, memory-mapped, or a napari layer's data).
            shape: the image's shape, which ``labels`` must have (None: any 3D shape).
            num_classes: the model's number of classes N (None: the highest label painted).
            min_classes: classes that must be painted: 2 for one volume; 1 for one of
                several volumes trained together (the two may be in different volumes).

        Raises:
            ValueError: naming what is wrong: shape, dtype, values out of 0..N, fewer than
                two classes painted.

        Example:
            >>> labels = np.zeros((4, 5, 6), dtype=np.uint8)
            >>> labels[1, 2, 2:4], labels[2, 3, 1] = 1, 3
            >>> a = Annotations.from_labels(labels)
            >>> a.num_classes, a.painted_classes, a.coords.shape
            (3, [1, 3], (3, 3))
        """
        labels = np.asarray(labels)
        if labels.ndim != 3:
            raise ValueError(f"Expected a 3D label volume (Z, Y, X), got shape {labels.shape}.")
        if shape is not None and labels.shape != tuple(shape):
            raise ValueError(f"The labels have shape {labels.shape}; expected the image's shape {tuple(shape)}.")
        if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
            raise ValueError(
                f"Expected integer labels (0 = not annotated, 1..N = classes), got dtype {labels.dtype}. "
                "Is it the image instead of the labels?"
            )
        coords = np.argwhere(labels != 0)
        classes = labels[tuple(coords.T)].astype(np.int64)
        present = np.unique(classes)
        if present.size and present.min() < 0:
            raise ValueError(f"Labels must be 0 (not annotated) or classes 1..N; found {int(present.min())}.")
        limit = int(present.max()) if num_classes is None and present.size else num_classes
        if present.size and present.max() > limit:
            raise ValueError(
                f"Labels must be 0 (not annotated) or 1..{limit} for this model's {limit} classes; "
                f"found {int(present.max())}."
            )
        if present.size < min_classes:
            raise ValueError(
                "The labels have no annotated voxels: paint strokes of at least two classes (0 = not annotated)."
                if present.size == 0
                else f"Only class {int(present[0])} is annotated: paint strokes of at least two classes so there "
                "is something to tell apart."
            )
        return cls(coords.astype(np.int64), classes, tuple(int(n) for n in labels.shape), int(limit))

    @property
    def painted_classes(self) -> list[int]:
        return [int(c) for c in np.unique(self.classes)]

    def __len__(self) -> int:
        return len(self.classes)

    def groups(self) -> np.ndarray:
        """``(P,)`` group ids for cross-validation: neighbouring voxels of one stroke are near
        copies, so folds split whole painted planes (strokes on a few slices, along the axis
        with fewest painted planes) or, for strokes drawn in 3D, whole 8^3 blocks."""
        planes = [np.unique(self.coords[:, axis]) for axis in range(3)]
        axis = int(np.argmin([len(p) for p in planes]))
        if 2 <= len(planes[axis]) <= _MAX_PLANE_GROUPS:
            return self.coords[:, axis].copy()
        blocks = self.coords // _BLOCK
        return (blocks[:, 0] * 73856093) ^ (blocks[:, 1] * 19349663) ^ (blocks[:, 2] * 83492791)

    def subsample(self, max_points: int, seed: int = 0) -> Annotations:
        """At most ``max_points`` voxels, the same number of each class where a class has more."""
        if len(self) <= max_points:
            return self
        rng = np.random.default_rng(seed)
        cap = max(1, max_points // len(self.painted_classes))
        keep = []
        for c in self.painted_classes:
            index = np.flatnonzero(self.classes == c)
            keep.append(index if index.size <= cap else rng.choice(index, cap, replace=False))
        keep = np.sort(np.concatenate(keep))
        return Annotations(self.coords[keep], self.classes[keep], self.shape, self.num_classes)


def annotations_of_volumes(
    labels: Iterable, shapes: Sequence[tuple[int, ...]], names: Sequence[str], num_classes: int | None = None
) -> list[Annotations]:
    """The label rule for volumes trained together: each label volume (or its
    :class:`Annotations`) checked against its image's shape; each needs one painted class,
    all of them together two (one volume alone: two).

    Args:
        labels: per volume, a label array or :class:`Annotations` (read one at a time: a
            generator keeps only one label volume in memory).
        shapes: per volume, its image's shape.
        names: per volume, a name for the error messages of several volumes.
        num_classes: the model's number of classes N (None: the highest label painted).
    """
    many = len(shapes) > 1
    annotations = []
    for item, shape, name in zip(labels, shapes, names, strict=True):
        try:
            annotations.append(_checked(item, tuple(shape), num_classes, 1 if many else 2))
        except ValueError as err:
            raise ValueError(f"{name}: {err}" if many else str(err)) from None
    if not annotations:
        raise ValueError("No (volume, labels) pairs to train on.")
    painted = sorted(set().union(*(a.painted_classes for a in annotations)))
    if len(painted) < 2:
        raise ValueError(f"Only class {painted[0]} is annotated in all {len(annotations)} volumes: paint strokes "
                         "of at least two classes so there is something to tell apart.")
    return annotations


def _checked(item, shape: tuple[int, ...], num_classes: int | None, min_classes: int) -> Annotations:
    if not isinstance(item, Annotations):
        return Annotations.from_labels(item, shape, num_classes, min_classes)
    if item.shape != shape:
        raise ValueError(f"The annotations are of shape {item.shape}; expected the image's shape {shape}.")
    if num_classes is not None and item.painted_classes[-1] > num_classes:
        raise ValueError(f"Labels must be 0 (not annotated) or 1..{num_classes} for this model's {num_classes} "
                         f"classes; found {item.painted_classes[-1]}.")
    return item
