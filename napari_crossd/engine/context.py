"""Auto-context: a second forest that also reads the first one's class maps, smoothed at a few scales.

Convention:
    Stage 1 is the segmenter's forest on the voxel features (:mod:`.voxel_features`). Its
    class probabilities are computed on the *context grid*, every ``stride``-th voxel of
    each axis (grid index ``i`` is voxel ``i * stride``), smoothed there by Gaussians of
    ``sigmas`` voxels and read back at any voxel by trilinear interpolation: N classes x
    ``len(sigmas)`` *context channels*, appended to the voxel features for stage 2. They say
    where a class lies relative to the others (a nucleus' boundary surrounds its interior),
    which no single voxel's features can.

    At the painted voxels the maps are *cross-fitted*: each fold of painted planes gets them
    from a stage-1 forest trained without its strokes. A forest's maps at its own training
    voxels are nearly always right, and a second forest trained on those learns to copy
    them; cross-fitted, it learns how far to trust them where it has seen no strokes
    (benchmarks/strokes/results/autocontext.md).

Prediction takes one pass over the blocks: each block's features give stage 1 on the grid
of the block grown by the maps' reach (within the features' halo), then stage 2 chunk by
chunk, each smoothing only the grid around it. Memory grows with the block, and each block
is computed once; at a block's edge the maps are as approximate as its features there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy import ndimage
from sklearn.metrics import f1_score
from sklearn.model_selection import GroupKFold

from .classifier import ForestClassifier
from .jobs import Job
from .voxel_features import FeatureSpec, VolumeFeatures

__all__ = ["ContextSpec", "class_maps_job", "context_of_box", "context_of_points", "context_scores",
           "cross_fitted_context_job"]

# Gaussians are cut at 3 sigma: the halo below then makes a block's maps equal the whole volume's.
_TRUNCATE = 3.0
# Folds of painted planes for the cross-fitting: one plane each for the usual few painted
# slices; strokes drawn in 3D (many small groups) get this many folds, not one forest per group.
_MAX_FOLDS = 8


@dataclass(frozen=True)
class ContextSpec:
    """Which class maps stage 2 reads.

    Attributes:
        sigmas: Gaussian scales (source voxels) of the smoothed class maps.
        stride: the context grid's step (voxels); stage 1 runs on 1/stride^3 of the voxels.
    """

    sigmas: tuple[float, ...] = (1.0, 2.0, 4.0)
    stride: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigmas", tuple(float(s) for s in self.sigmas))
        if not self.sigmas or min(self.sigmas) <= 0 or int(self.stride) < 1:
            raise ValueError(f"Expected positive context sigmas and a stride >= 1, got {self.sigmas}, {self.stride}.")
        object.__setattr__(self, "stride", int(self.stride))

    def channels(self, num_classes: int) -> int:
        return num_classes * len(self.sigmas)

    @property
    def grid_halo(self) -> int:
        """Grid points around a box whose maps reach it: the widest Gaussian and one for interpolation."""
        return int(_TRUNCATE * max(self.sigmas) / self.stride + 0.5) + 1

    @property
    def halo(self) -> int:
        """The same reach in voxels (what a block or a cluster worker's region must add)."""
        return (self.grid_halo + 1) * self.stride

    def to_dict(self) -> dict:
        return {"sigmas": list(self.sigmas), "stride": self.stride}

    @classmethod
    def from_dict(cls, config: dict) -> ContextSpec:
        return cls(tuple(config["sigmas"]), int(config["stride"]))


def class_maps_job(
    classifier: ForestClassifier, source: VolumeFeatures, spec: FeatureSpec, context: ContextSpec,
    device: torch.device, region: Sequence[slice] | None = None, phase: str = "predict", block: int | None = None,
) -> Job[tuple[np.ndarray, tuple[int, int, int]]]:
    """Stage-1 probabilities ``(N, gz, gy, gx)`` float16 on the context grid inside ``region``
    (default: the volume), and the grid index of their first point; reports carry ``phase``.
    ``block``: from that block's features alone (:meth:`.VolumeFeatures.grid_chunks_job`)."""
    region = tuple(region or (slice(0, n) for n in source.shape))
    first = [-(-r.start // context.stride) for r in region]
    shape = [-(-r.stop // context.stride) - f for r, f in zip(region, first, strict=True)]
    maps = np.zeros((classifier.num_classes, *shape), np.float16)
    for report, payload in source.grid_chunks_job(device, spec, context.stride, region, block):
        yield replace(report, phase=phase)
        if payload is not None:
            grid_box, features = payload
            rows = np.ascontiguousarray(features.flatten(1).T.numpy())
            local = tuple(slice(g.start - f, g.stop - f) for g, f in zip(grid_box, first, strict=True))
            maps[(slice(None), *local)] = classifier.predict_proba(rows).T.reshape(-1, *features.shape[1:])
    return maps, tuple(first)


def _smoothed(maps: np.ndarray, context: ContextSpec) -> np.ndarray:
    """Every class map at every scale, ``(N * S, ...)`` float32, class-major."""
    return np.stack([ndimage.gaussian_filter(m.astype(np.float32), s / context.stride, mode="nearest",
                                             truncate=_TRUNCATE) for m in maps for s in context.sigmas])


def context_of_points(maps: np.ndarray, origin: Sequence[int], points: np.ndarray, context: ContextSpec) -> np.ndarray:
    """Context channels ``(K, ...)`` at voxel coordinates ``points`` ``(3, ...)`` from stage-1
    ``maps`` on the grid from index ``origin`` (their smoothing reads the whole of ``maps``)."""
    smoothed = _smoothed(maps, context)
    grid = np.stack([p / context.stride - o for p, o in zip(points, origin, strict=True)]).astype(np.float32)
    return np.stack([ndimage.map_coordinates(m, grid, order=1, mode="nearest") for m in smoothed])


def context_of_box(maps: np.ndarray, origin: Sequence[int], box: Sequence[slice], context: ContextSpec) -> np.ndarray:
    """Context channels ``(K, z, y, x)`` of every voxel in ``box`` from stage-1 ``maps`` on the
    grid from index ``origin`` (:func:`class_maps_job`); only the grid around the box is smoothed."""
    near = tuple(slice(max(0, b.start // context.stride - context.grid_halo - o),
                       min(n, (b.stop - 1) // context.stride + 1 + context.grid_halo - o))
                 for b, o, n in zip(box, origin, maps.shape[1:], strict=True))
    points = np.meshgrid(*(np.arange(b.start, b.stop) for b in box), indexing="ij")
    return context_of_points(maps[(slice(None), *near)], [s.start + o for s, o in zip(near, origin, strict=True)],
                             np.stack(points), context)


def cross_fitted_context_job(
    classifier: ForestClassifier, columns: np.ndarray, classes: np.ndarray, groups: np.ndarray,
    volumes: np.ndarray, coords: np.ndarray, sources: Sequence[VolumeFeatures], spec: FeatureSpec,
    context: ContextSpec, device: torch.device, seed: int = 0,
) -> Job[np.ndarray | None]:
    """Context channels ``(P, K)`` at the painted voxels, each fold's from a forest without its strokes.

    Args:
        classifier: stage 1 (its settings; it is not refit).
        columns, classes, groups: ``(P, C)`` features, ``(P,)`` classes and held-out groups of the
            painted voxels (as :func:`.segmenter.choose_levels`).
        volumes, coords: ``(P,)`` which of ``sources`` each voxel is in, ``(P, 3)`` where.
        sources: every volume's features.

    Returns:
        The channels, or None when the strokes lie in fewer than two groups (nothing to hold out).
    """
    count = len(np.unique(groups))
    if count < 2:
        return None
    out = np.empty((len(classes), context.channels(classifier.num_classes)), np.float32)
    folds = list(GroupKFold(min(_MAX_FOLDS, count)).split(columns, classes, groups))
    for train, held in folds:
        forest = classifier.unfitted(seed).fit(columns[train], classes[train])
        for volume in np.unique(volumes[held]):
            these = held[volumes[held] == volume]
            source, points = sources[volume], coords[these]
            region = tuple(slice(max(0, int(lo) - context.halo), min(n, int(hi) + 1 + context.halo))
                           for lo, hi, n in zip(points.min(0), points.max(0), source.shape, strict=True))
            maps, origin = yield from class_maps_job(forest, source, spec, context, device, region, phase="fit")
            out[these] = context_of_points(maps, origin, points.T, context).T
    return out



def context_scores(
    classifier: ForestClassifier, columns: np.ndarray, context: np.ndarray, classes: np.ndarray, groups: np.ndarray,
    trees: int, seed: int = 0,
) -> tuple[float, float]:
    """Macro F1 on held-out groups of painted planes of a forest without and with the
    cross-fitted ``context`` channels (``trees`` each, ``classifier``'s other settings)."""
    folds = list(GroupKFold(min(_MAX_FOLDS, len(np.unique(groups)))).split(columns, classes, groups))
    scores = []
    for features in (columns, np.concatenate([columns, context], 1)):
        fold_scores = []
        for train, held in folds:
            forest = classifier.unfitted(seed)
            forest.trees = trees
            predicted = forest.fit(features[train], classes[train]).predict_proba(features[held]).argmax(1) + 1
            fold_scores.append(f1_score(classes[held], predicted, average="macro"))
        scores.append(float(np.mean(fold_scores)))
    return scores[0], scores[1]
