"""Simulated users and scores: strokes a user would paint, their corrections, and Dice.

Benchmarks, the demo and the tests score segmentations of :mod:`napari_crossd.datasets`'
tasks with these. Volumes are (Z, Y, X); label 0 means "not annotated".
"""

from __future__ import annotations

import numpy as np

__all__ = ["dice_scores", "paint_corrections", "paint_strokes", "painted_slices"]


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
