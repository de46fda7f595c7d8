"""What a voxel classifier reads: grey value, 3D filter bank and encoder levels, block by block.

Convention:
    A voxel's feature vector is, in order: its normalised grey value, the filter bank's
    responses (:mod:`.filters`, full resolution) and the encoder's levels (trilinearly
    interpolated from their strides; see :mod:`.pyramid`). :class:`FeatureSpec` says which.

    The volume is cut into *blocks*: boxes of the source grid that tile it without overlap.
    Each block is computed from the box grown by a *halo* (clipped to the volume) so that
    filters and the encoder see real tissue around it, and every voxel's features come
    from the one block that holds it: training and prediction read the same values (to
    float rounding: sampled at points, or sliced and upsampled as a box). A volume that
    fits the memory budget is a single block, computed once and kept by
    :class:`VolumeFeatures`; bigger ones are slabs (or boxes) computed one at a time, so
    memory grows with the block, not with the volume.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import product

import numpy as np
import torch
from torch import nn

from .devices import release_memory
from .features import feature_channels
from .filters import filter_halo, filter_names
from .jobs import Job, Progress
from .normalize import IntensityStats, check_volume, intensity_stats
from .pyramid import Pyramid, coarse_factor, encode_job, spacing_scale

__all__ = ["DEFAULT_BLOCK_BYTES", "DEFAULT_SETS", "FeatureSpec", "VolumeFeatures", "block_boxes"]

# Context around a block for what reaches far (coarse filter maps, encoder levels): two
# strides of 16. Their exact reach (a sigma-16 Gaussian's 64 voxels, a stride-16 level's
# receptive field) would make the blocks of a big volume mostly halo.
_CONTEXT_HALO = 32
# The structure tensor doubles the filter bank's cost (two Gaussian stages, six products)
# and its halo; the encoder's levels already carry texture at those scales.
DEFAULT_SETS = ("gaussian", "gradient", "log", "hessian")
# Features of one block (filter responses at full resolution dominate: 4 bytes each) are
# kept within this budget (768 MiB); the MNI152 template (189 x 233 x 197) is one block,
# and a 512^3 volume peaks under 2 GiB in blocks (benchmarks/results/segment_memory_cpu.md).
DEFAULT_BLOCK_BYTES = 3 << 28
# Voxels classified at once: (voxels x channels) float32 of about 64 MB (its assembly and the
# forest's row copy double that, beside a block's features).
_CHUNK_VALUES = 1 << 24


@dataclass(frozen=True)
class FeatureSpec:
    """Which features each voxel gets.

    Attributes:
        levels: indices into the encoder's ``feature_info`` (empty: no deep features).
        sigmas: scales (encoded voxels) of the filter bank (empty: no filter bank); those
            above :data:`.pyramid.FINE_SIGMA` run on coarser grids (:meth:`.Pyramid.with_filters`).
        sets: filter families (of :data:`napari_crossd.engine.filters.FILTER_SETS`).
    """

    levels: tuple[int, ...]
    sigmas: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)
    sets: tuple[str, ...] = DEFAULT_SETS

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(int(level) for level in self.levels))
        object.__setattr__(self, "sigmas", tuple(float(s) for s in self.sigmas))
        object.__setattr__(self, "sets", tuple(self.sets))
        if self.sigmas:
            filter_names(self.sigmas, self.sets)  # checks sigmas and set names

    def names(self, encoder: nn.Module) -> list[str]:
        """One name per channel, e.g. ``"hessian_eig1 s=2"`` or ``"level 2 (stride 8) #5"``."""
        filters = filter_names(self.sigmas, self.sets)[1:] if self.sigmas else []
        deep = [
            f"level {level} (stride {encoder.feature_info[level]['reduction']}) #{i}"
            for level in self.levels
            for i in range(encoder.feature_info[level]["num_chs"])
        ]
        return ["intensity", *filters, *deep]

    def channels(self, encoder: nn.Module) -> int:
        filters = len(filter_names(self.sigmas, self.sets)) - 1 if self.sigmas else 0
        return 1 + filters + feature_channels(encoder, self.levels)

    def halo(self, encoder: nn.Module) -> int:
        """Voxels of context around a block: the full-resolution filters' reach (exact), and
        for the coarse filter maps and the encoder levels, whose reach is much wider, at most
        two strides of 16: they are approximate at a block's edge, as tiles are (tested)."""
        fine = [s for s in self.sigmas if coarse_factor(s) == 1]
        deepest = max((int(encoder.feature_info[level]["reduction"]) for level in self.levels), default=0)
        coarse = _CONTEXT_HALO if len(fine) < len(self.sigmas) else 0
        return max(filter_halo(fine, self.sets) if fine else 0, coarse, min(2 * deepest, _CONTEXT_HALO))

    @property
    def grid_multiple(self) -> int:
        """What the encoded grid is padded to a multiple of, for the coarse filter maps."""
        return max((coarse_factor(s) for s in self.sigmas), default=1)

    def bytes_per_voxel(self, encoder: nn.Module) -> float:
        per_sigma = (len(filter_names((1.0,), self.sets)) - 1) if self.sigmas else 0
        filters = sum(per_sigma / coarse_factor(s) ** 3 for s in self.sigmas)
        deep = sum(
            encoder.feature_info[level]["num_chs"] / encoder.feature_info[level]["reduction"] ** 3
            for level in self.levels
        )
        # intensity, filters, levels (the filter bank's temporaries are bounded by its slabs)
        return 4.0 * (1 + filters + deep)

    def to_dict(self) -> dict:
        return {"levels": list(self.levels), "sigmas": list(self.sigmas), "sets": list(self.sets)}

    @classmethod
    def from_dict(cls, config: dict) -> FeatureSpec:
        return cls(tuple(config["levels"]), tuple(config["sigmas"]), tuple(config["sets"]))


def block_boxes(shape: Sequence[int], halo: int, max_voxels: int) -> list[tuple[slice, slice, slice]]:
    """Boxes that tile ``shape`` so that each, grown by ``halo``, holds at most ``max_voxels``.

    Each cut goes where it shrinks the grown box most (Z first on ties: whole planes keep
    in-plane context intact and read contiguous memory).

    >>> [tuple((s.start, s.stop) for s in box) for box in block_boxes((10, 4, 4), 1, 150)]
    [((0, 5), (0, 4), (0, 4)), ((5, 10), (0, 4), (0, 4))]
    """
    shape = [int(n) for n in shape]
    splits = [1, 1, 1]

    def grown(axis: int, parts: int) -> int:
        return min(shape[axis], math.ceil(shape[axis] / parts) + 2 * halo)

    while math.prod(grown(axis, splits[axis]) for axis in range(3)) > max_voxels:
        cuttable = [axis for axis in range(3) if splits[axis] < shape[axis]]
        if not cuttable:
            break
        gain = {axis: grown(axis, splits[axis]) / grown(axis, splits[axis] + 1) for axis in cuttable}
        best = max(cuttable, key=lambda axis: (gain[axis], -axis))
        if gain[best] == 1:  # no single cut helps yet (the halo dominates): cut the longest box
            best = max(cuttable, key=lambda axis: (math.ceil(shape[axis] / splits[axis]), -axis))
        splits[best] += 1
    edges = [np.linspace(0, n, k + 1).round().astype(int) for n, k in zip(shape, splits, strict=True)]
    return [
        tuple(slice(int(e[i]), int(e[i + 1])) for e, i in zip(edges, index, strict=True))
        for index in product(*(range(k) for k in splits))
    ]


@dataclass
class VolumeFeatures:
    """The features of one volume for one encoder and :class:`FeatureSpec`, owned by the caller.

    Training reads the features of annotated voxels, prediction those of every block. The
    caller keeps this object for as long as the volume and the encoder stay the same (a
    widget keeps one per image layer) and hands it to :func:`~napari_crossd.engine.finetune`
    and :func:`~napari_crossd.engine.segment`; what is cached is in plain view: the last
    block computed (:attr:`block`) and the feature vectors of voxels already trained on
    (:attr:`columns`). The volume is never copied whole; it is read block by block.

    Args:
        volume: (Z, Y, X) numpy or memory-mapped array.
        encoder: the 3D network (eval mode).
        spec: what each voxel gets.
        preset: intensity normalisation.
        stats: the normalisation's statistics when they were measured on a bigger volume this
            is a part of (a dask block); otherwise measured on first use.
        spacing, resample: voxel size and resampling (:func:`.pyramid.spacing_scale`).
        tile, overlap, batch: the encoder's sliding window inside a block (:func:`.pyramid.encode_job`).
        block_bytes: feature memory per block (default: the whole volume when it fits
            :data:`DEFAULT_BLOCK_BYTES`, else blocks of half of it).
        boxes: the blocks themselves instead (boxes of the source grid, each grown by the
            halo within the volume): a cluster worker given one block and its halo as the
            volume computes and classifies only that block.
    """

    volume: object
    encoder: nn.Module
    spec: FeatureSpec
    preset: str = "auto"
    spacing: Sequence[float] | None = None
    resample: bool | None = None
    tile: int | None = None
    overlap: float = 0.25
    batch: int = 1
    block_bytes: int | None = None
    boxes: list[tuple[slice, slice, slice]] | None = None
    stats: IntensityStats | None = None
    block: tuple[int, Pyramid] | None = field(default=None, repr=False)
    columns: dict[tuple[int, int, int], np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        check_volume(self.volume)
        self.shape = tuple(int(n) for n in self.volume.shape)
        self.scale = spacing_scale(self.spacing, self.resample)
        self.halo = self.spec.halo(self.encoder)
        if self.boxes is None:
            self.boxes = self._blocks_within_budget()
        elif self.block_bytes is not None:
            raise ValueError("Give either block_bytes= or boxes=, not both.")
        self.channels = self.spec.channels(self.encoder)

    def _blocks_within_budget(self) -> list[tuple[slice, slice, slice]]:
        per_voxel = self.spec.bytes_per_voxel(self.encoder) * math.prod(self.scale)
        if self.block_bytes is None:
            # A volume that fits the budget is one block; a bigger one is cut into blocks of half
            # of it, which leaves room for its labels and the classification chunks.
            whole = block_boxes(self.shape, self.halo, int(DEFAULT_BLOCK_BYTES / per_voxel))
            budget = DEFAULT_BLOCK_BYTES if len(whole) == 1 else DEFAULT_BLOCK_BYTES // 2
        else:
            budget = self.block_bytes
        return block_boxes(self.shape, self.halo, max(int(budget / per_voxel), (2 * self.halo + 1) ** 3))

    def serves(self, volume, encoder: nn.Module, spec: FeatureSpec, spacing, resample) -> bool:
        """Whether these features begin with those of ``volume`` under ``encoder`` and ``spec``
        (the same objects: a changed image is a new layer or a new array). ``spec`` may keep
        fewer encoder levels: its channels are then the first ones of these."""
        return (
            volume is self.volume
            and encoder is self.encoder
            and (spec.sigmas, spec.sets) == (self.spec.sigmas, self.spec.sets)
            and self.spec.levels[: len(spec.levels)] == spec.levels
            and spacing_scale(spacing, resample) == self.scale
        )

    def _grown(self, box: tuple[slice, slice, slice]) -> tuple[slice, slice, slice]:
        return tuple(
            slice(max(0, s.start - self.halo), min(n, s.stop + self.halo)) for s, n in zip(box, self.shape, strict=True)
        )

    def block_job(self, index: int, device: torch.device) -> Job[Pyramid]:
        """The :class:`Pyramid` (levels and filters) of block ``index`` grown by the halo."""
        if self.block is not None and self.block[0] == index:
            return self.block[1]
        self.block = None  # a stale block can be large: free it before computing the next
        if self.stats is None:  # measured here, in the job, not where the object is made (a GUI thread)
            self.stats = intensity_stats(self.volume, self.preset)
        grown = self._grown(self.boxes[index])
        region = np.asarray(self.volume[grown])
        pyramid = yield from encode_job(
            self.encoder, region, self.stats, levels=self.spec.levels, scale=self.scale, tile=self.tile,
            overlap=self.overlap, batch=self.batch, multiple=self.spec.grid_multiple, device=device,
        )
        if self.spec.sigmas:
            yield Progress(0, None, f"filter bank of block {index + 1}/{len(self.boxes)}", phase="features")
            pyramid = pyramid.with_filters(self.spec.sigmas, self.spec.sets)
            release_memory(device)  # the filters' temporaries
        self.block = (index, pyramid)
        return pyramid

    def _box_of(self, coords: np.ndarray) -> np.ndarray:
        starts = [np.array([box[axis].start for box in self.boxes]) for axis in range(3)]
        stops = [np.array([box[axis].stop for box in self.boxes]) for axis in range(3)]
        inside = np.ones((len(coords), len(self.boxes)), dtype=bool)
        for axis in range(3):
            c = coords[:, axis : axis + 1]
            inside &= (c >= starts[axis]) & (c < stops[axis])
        return inside.argmax(1)

    def columns_job(self, coords: np.ndarray, device: torch.device) -> Job[np.ndarray]:
        """Feature vectors ``(P, C)`` float32 of the voxels ``coords`` (P, 3); computed once each."""
        coords = np.asarray(coords, dtype=np.int64)
        keys = [tuple(int(v) for v in c) for c in coords]
        missing = np.array([key not in self.columns for key in keys], dtype=bool)
        if missing.any():
            todo = coords[missing]
            owners = self._box_of(todo)
            # The cached block first: a volume of one block is never encoded twice.
            order = sorted(set(owners.tolist()), key=lambda i: (self.block is None or self.block[0] != i, i))
            for step, index in enumerate(order):
                yield Progress(step, len(order), f"features of block {index + 1}/{len(self.boxes)}", phase="features")
                pyramid = yield from self.block_job(index, device)
                points = todo[owners == index]
                offset = np.array([s.start for s in self._grown(self.boxes[index])])
                values = self._sample(pyramid, torch.from_numpy(points - offset))
                self.columns.update(zip(map(tuple, points.tolist()), values, strict=True))
        return np.stack([self.columns[key] for key in keys]) if keys else np.zeros((0, self.channels), np.float32)

    def _sample(self, pyramid: Pyramid, points: torch.Tensor) -> np.ndarray:
        filters = bool(self.spec.sigmas)
        out = [pyramid.sample(chunk, intensity=True, filters=filters) for chunk in points.split(1 << 16)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.channels), np.float32)

    def chunks_job(self, device: torch.device, spec: FeatureSpec | None = None, block: int | None = None) -> Iterator:
        """Yield ``(Progress, None)`` while computing, then ``(Progress, (box, features))`` for
        every chunk of planes of every block (or of ``block`` only): ``features`` is
        ``(C, z, y, x)`` float32 on the source grid's ``box``. The cached block is visited first.

        ``spec``: the features to assemble, these or fewer encoder levels (what a segmenter
        that chose its levels reads; default: all of these). Levels left out are never upsampled.
        """
        spec = spec or self.spec
        if not self.serves(self.volume, self.encoder, spec, self.spacing, self.resample):
            raise ValueError(f"These features hold {self.spec}; {spec} is not a part of them.")
        per_voxel = spec.channels(self.encoder)
        for count, index in self._visits(block):
            pyramid = yield from _paired(self.block_job(index, device))
            box = self.boxes[index]
            local = [slice(b.start - g.start, b.stop - g.start) for b, g in zip(box, self._grown(box), strict=True)]
            per_plane = per_voxel * (box[1].stop - box[1].start) * (box[2].stop - box[2].start)
            thickness = max(1, _CHUNK_VALUES // per_plane)
            for start in range(local[0].start, local[0].stop, thickness):
                planes = slice(start, min(start + thickness, local[0].stop))
                features = pyramid.box((planes, local[1], local[2]), intensity=True, depth=len(spec.levels),
                                       filters=bool(spec.sigmas))
                shift = box[0].start - local[0].start
                report = Progress(count, len(self.boxes), f"classifying block {count + 1}/{len(self.boxes)}",
                                  phase="predict")
                yield report, ((slice(planes.start + shift, planes.stop + shift), box[1], box[2]), features)
            # Nothing of this block may stay alive while the next one is computed.
            del pyramid, features

    def grid_chunks_job(self, device: torch.device, spec: FeatureSpec, stride: int, region=None,
                        block: int | None = None) -> Iterator:
        """:meth:`chunks_job` on the *grid* of every ``stride``-th voxel of each axis (voxel
        ``i * stride``, grid index ``i``) inside ``region`` (a box of the volume; default: all
        of it): ``(Progress, (grid box, features (C, gz, gy, gx)))`` for chunks of grid planes.

        Blocks that tile the volume give their own grid points; ``block`` alone, or a block
        given as ``boxes=`` without its surroundings (a cluster worker's), gives those of its
        grown box as well.
        """
        region = region or tuple(slice(0, n) for n in self.shape)
        tiled = block is None and sum(math.prod(s.stop - s.start for s in box)
                                      for box in self.boxes) == math.prod(self.shape)
        for count, index in self._visits(block):
            box = self.boxes[index] if tiled else self._grown(self.boxes[index])
            part = [slice(-(-max(r.start, b.start) // stride), -(-min(r.stop, b.stop) // stride))
                    for r, b in zip(region, box, strict=True)]
            if any(g.start >= g.stop for g in part):
                continue
            pyramid = yield from _paired(self.block_job(index, device))
            offset = [g.start for g in self._grown(self.boxes[index])]
            axes = [torch.arange(g.start, g.stop) * stride - o for g, o in zip(part, offset, strict=True)]
            per_plane = spec.channels(self.encoder) * len(axes[1]) * len(axes[2])
            thickness = max(1, _CHUNK_VALUES // per_plane)
            report = Progress(count, len(self.boxes), f"class maps of block {count + 1}/{len(self.boxes)}",
                              phase="predict")
            for start in range(0, len(axes[0]), thickness):
                planes = slice(start, min(start + thickness, len(axes[0])))
                features = pyramid.sample_grid((axes[0][planes], axes[1], axes[2]), intensity=True,
                                               depth=len(spec.levels), filters=bool(spec.sigmas))
                grid_box = (slice(part[0].start + planes.start, part[0].start + planes.stop), part[1], part[2])
                yield report, (grid_box, features)
            del pyramid, features

    def order(self) -> list[int]:
        """Block indices, the cached block first: a volume of one block is never encoded twice."""
        return sorted(range(len(self.boxes)), key=lambda i: (self.block is None or self.block[0] != i, i))

    def _visits(self, block: int | None) -> list[tuple[int, int]]:
        """``(step, block index)`` of every block in :meth:`order`, or ``(block, block)`` alone."""
        return list(enumerate(self.order())) if block is None else [(block, block)]


def _paired(job: Job):
    """``job``'s reports as ``(Progress, None)`` pairs; returns what ``job`` returns."""
    while True:
        try:
            report = next(job)
        except StopIteration as stop:
            return stop.value
        yield report, None
