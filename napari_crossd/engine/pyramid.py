"""The encoder's multi-scale features of a whole volume, computed tile by tile.

Convention:
    The *source grid* is the user's volume (Z, Y, X), voxel centres at integer
    coordinates. The *encoded grid* is the grid the network runs on: the source grid
    resampled to (nearly) isotropic voxels when the spacing asks for it, then zero-padded
    at the far end of each axis to a multiple of the deepest level's stride ``s``. Level
    ``l`` (stride ``s_l``) holds one vector per ``s_l``-cube of the encoded grid.
    Hypercolumns are read at any source-grid point by trilinear interpolation of every
    level, with the mapping of ``F.interpolate(..., mode="trilinear",
    align_corners=False)`` and clamping at the borders: sampling every voxel of a level
    upsampled by its stride gives exactly ``F.interpolate(level, scale_factor=s_l)``.

Tiles are cubes of the encoded grid, a multiple of the deepest stride, overlapping by a
fraction of their size; each level of a tile's output is weighted by a Gaussian that
falls to ~3e-4 at the tile's faces (sigma = 1/8 of the tile, as nnU-Net does), so that
the features near a tile's border, which saw zero padding instead of the neighbouring
tissue, hardly count where another tile covers them.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from itertools import product

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models.inspect import input_channels
from ..models.meta import model_meta
from .devices import autocast, is_out_of_memory, release_memory
from .filters import FILTER_SETS, filter_bank, filter_box, filter_halo, filter_names
from .jobs import Job, Progress
from .normalize import IntensityStats, network_input, unit_intensity

__all__ = [
    "Pyramid",
    "default_levels",
    "default_tile",
    "encode_job",
    "forward_levels",
    "network_on",
    "spacing_scale",
]

# Anisotropy (largest / smallest spacing) above which volumes are resampled to isotropic
# voxels before encoding: 2D-pretrained kernels assume square pixels, and up to 2:1 the
# features measured no worse than resampled ones while costing nothing.
ANISOTROPY_LIMIT = 2.0
_MIN_TILE_STRIDES = 2


class _LevelsDone(Exception):
    """Raised by the hook on the deepest requested level to skip the rest of the network."""


def forward_levels(model: nn.Module, x: torch.Tensor, levels: Sequence[int]) -> list[torch.Tensor]:
    """The outputs of ``model.forward_features`` at ``levels``, without running deeper layers.

    The deeper stages of a ResNet-50 cost more than the shallow ones a hypercolumn needs,
    so the forward stops at the deepest requested level (a forward hook raises).

    Args:
        model: a network with ``forward_features`` and timm-style ``feature_info``.
        x: input ``(B, C, D, H, W)``.
        levels: indices into ``model.feature_info``.
    """
    modules = dict(model.named_modules())
    names = [model.feature_info[level]["module"] for level in levels]
    last = names[int(np.argmax(levels))]
    outputs: dict[str, torch.Tensor] = {}
    # Dask runs blocks in threads that share the model, and hooks fire for every caller.
    owner = threading.get_ident()

    def keep(name: str):
        def hook(module, args, output):
            if threading.get_ident() != owner:
                return
            outputs[name] = output
            if name == last:
                raise _LevelsDone

        return hook

    handles = [modules[name].register_forward_hook(keep(name)) for name in set(names)]
    try:
        model.forward_features(x)
    except _LevelsDone:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return [outputs[name] for name in names]


def network_on(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` itself when it is in eval mode with every tensor on ``device``, else an
    eval-mode copy there: a job never moves or retrains a network that others share."""
    tensors = [*model.parameters(), *model.buffers()]
    if not model.training and all(t.device == device for t in tensors):
        return model
    copy_ = copy.deepcopy(model).eval()
    return copy_.to(device)


def default_levels(model: nn.Module, max_stride: int = 8) -> list[int]:
    """Levels with stride up to ``max_stride``: fine enough for voxel-wise work, and cheap."""
    return [i for i, info in enumerate(model.feature_info) if info["reduction"] <= max_stride]


def default_tile(device: torch.device, stride: int) -> int:
    """Tile edge for ``device``: 96 on CPU/MPS, 128 or 192 on CUDA by its memory; a multiple of ``stride``."""
    tile = 96
    if device.type == "cuda":
        tile = 192 if torch.cuda.get_device_properties(device).total_memory >= 20 * 2**30 else 128
    return math.ceil(tile / stride) * stride


def spacing_scale(spacing: Sequence[float] | None, resample: bool | None = None) -> tuple[float, float, float]:
    """Encoded voxels per source voxel along (Z, Y, X).

    Args:
        spacing: voxel size (Z, Y, X) in any unit, or None for isotropic.
        resample: resample to isotropic voxels at the finest spacing; None (default) does so
            when the anisotropy exceeds :data:`ANISOTROPY_LIMIT`.
    """
    if spacing is None:
        return (1.0, 1.0, 1.0)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"Expected a voxel spacing of three positive numbers (Z, Y, X), got {spacing}.")
    if resample is None:
        resample = max(spacing) / min(spacing) > ANISOTROPY_LIMIT
    if not resample:
        return (1.0, 1.0, 1.0)
    return tuple(s / min(spacing) for s in spacing)


def _gaussian(size: Sequence[int]) -> torch.Tensor:
    axes = []
    for n in size:
        x = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
        axes.append(torch.exp(-0.5 * (x / (n / 8)) ** 2))
    return axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]


def _starts(size: int, tile: int, step: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, step))
    return [*starts, size - tile]


@dataclass
class Pyramid:
    """Features of one volume at several strides, plus its normalised grey values.

    Attributes:
        levels: ``(C_l, Z_l, Y_l, X_l)`` float32 CPU tensors on the padded encoded grid.
        strides: stride of each level.
        intensity: ``(Z_p, Y_p, X_p)`` normalised grey values on the padded encoded grid.
        source_shape: the user's grid.
        scale: encoded voxels per source voxel along (Z, Y, X).
        origin: encoded-grid position of the first voxel of ``levels`` and ``intensity``
            (not zero for a crop of the volume).
        stats: the intensity statistics ``intensity`` was normalised with.
        filters: filter-bank responses of ``intensity`` (see :meth:`with_filters`), one
            ``(K, Z_p / f, Y_p / f, X_p / f)`` map per stride ``f`` in ``filter_strides``
            (1: full resolution), or None.
        filter_strides: the stride of each map in ``filters``.
    """

    levels: list[torch.Tensor]
    strides: list[int]
    intensity: torch.Tensor
    source_shape: tuple[int, int, int]
    scale: tuple[float, float, float]
    origin: tuple[int, int, int] = (0, 0, 0)
    stats: IntensityStats | None = None
    filters: list[torch.Tensor] | None = None
    filter_strides: list[int] = field(default_factory=list)

    @property
    def padded_shape(self) -> tuple[int, int, int]:
        return tuple(self.intensity.shape)

    def channels(self, intensity: bool = False, depth: int | None = None, filters: bool = False) -> int:
        """Length of a hypercolumn from :meth:`sample` with the same arguments."""
        return sum(m.shape[0] for m, _ in self._maps(intensity, depth, filters))

    def _grid(self, points: torch.Tensor, extent: Sequence[int]) -> torch.Tensor:
        # Source voxel o -> encoded coordinate e = (o + 0.5) * scale - 0.5 - origin ->
        # grid_sample's normalised coordinate 2 (e + 0.5) / extent - 1, where a map's extent
        # is its size times its stride (the padded grid for the levels).
        device = self.intensity.device
        scale = torch.tensor(self.scale, dtype=torch.float32, device=device)
        origin = torch.tensor(self.origin, dtype=torch.float32, device=device)
        extent = torch.tensor(tuple(extent), dtype=torch.float32, device=device)
        normalised = 2 * ((points.to(device).float() + 0.5) * scale - origin) / extent - 1
        return normalised.flip(-1)  # grid_sample wants (x, y, z)

    def with_filters(self, sigmas: Sequence[float], sets: Sequence[str] = FILTER_SETS) -> Pyramid:
        """This pyramid with :attr:`filters`: the filter bank of :attr:`intensity` at ``sigmas``
        (encoded voxels; see :mod:`.filters`), without its repeated grey-value channel.

        Scales up to :data:`FINE_SIGMA` run at full resolution on the encoded grid without its
        zero padding (borders: nearest voxel) and stay that size. Larger ones run
        at :data:`FINE_SIGMA` on the grey values averaged over ``f``-cubes (``f = sigma /
        FINE_SIGMA``), a map of stride ``f`` read like an encoder level: a Gaussian that wide
        has nothing a finer grid would add, and it then costs 1/f^3. Their responses are in
        units of coarse voxels, which a forest's thresholds do not mind.
        """
        encoded = _encoded_shape(self.source_shape, self.scale)
        unit = self.intensity[tuple(slice(0, n) for n in encoded)]
        fine = [s for s in sigmas if s <= FINE_SIGMA]
        maps = [_filter_bank_in_slabs(unit, fine, sets)] if fine else []  # the encoded grid: no padded copy
        strides = [1] * len(maps)
        for sigma in (s for s in sigmas if s > FINE_SIGMA):
            factor = coarse_factor(sigma)
            if any(n % factor for n in self.padded_shape):
                raise ValueError(f"The padded grid {self.padded_shape} is not a multiple of {factor} (sigma {sigma}).")
            coarse = F.avg_pool3d(self.intensity[None, None], factor)[0, 0]
            inside = [math.ceil(n / factor) for n in encoded]
            bank = filter_bank(coarse[tuple(slice(0, n) for n in inside)], (sigma / factor,), sets)[1:]
            maps.append(F.pad(bank, _far_padding(inside, coarse.shape)))
            strides.append(factor)
        return replace(self, filters=maps, filter_strides=strides)

    def _maps(self, intensity: bool, depth: int | None, filters: bool) -> list[tuple[torch.Tensor, int]]:
        """The maps a hypercolumn reads, with their strides, in order."""
        if filters and self.filters is None:
            raise ValueError("This pyramid has no filter responses: make them with Pyramid.with_filters.")
        levels = self.levels if depth is None else self.levels[:depth]
        maps = [(self.intensity[None], 1)] if intensity else []
        if filters:
            maps += list(zip(self.filters, self.filter_strides, strict=True))
        return maps + list(zip(levels, self.strides, strict=False))

    def _interpolate(self, points: torch.Tensor, intensity: bool, depth: int | None, filters: bool) -> torch.Tensor:
        """Hypercolumns ``(C, *points.shape[:-1])`` at source-grid points ``(Z', Y', X', 3)``."""
        grids: dict[tuple, torch.Tensor] = {}
        columns = []
        for m, stride in self._maps(intensity, depth, filters):
            extent = tuple(n * stride for n in m.shape[1:])
            if extent not in grids:
                grids[extent] = self._grid(points, extent)[None]
            columns.append(
                F.grid_sample(m[None], grids[extent], mode="bilinear", padding_mode="border", align_corners=False)[0]
            )
        return torch.cat(columns)

    def sample(
        self, points: torch.Tensor, intensity: bool = False, depth: int | None = None, filters: bool = False
    ) -> torch.Tensor:
        """Hypercolumns ``(P, C)`` at source-grid points ``(P, 3)`` (Z, Y, X, may be fractional).

        In order: the normalised grey value (with ``intensity``), its filter responses (with
        ``filters``), then the first ``depth`` levels (all by default).
        """
        return self._interpolate(points.view(-1, 1, 1, 3), intensity, depth, filters).flatten(1).T

    def sample_grid(
        self, axes: Sequence[torch.Tensor], intensity: bool = False, depth: int | None = None, filters: bool = False
    ) -> torch.Tensor:
        """Hypercolumns ``(C, len(z), len(y), len(x))`` on the product of source coordinates ``axes``."""
        z, y, x = (a.float() for a in axes)
        points = torch.stack(torch.meshgrid(z, y, x, indexing="ij"), dim=-1)
        return self._interpolate(points, intensity, depth, filters)

    def box(
        self, box: Sequence[slice], intensity: bool = False, depth: int | None = None, filters: bool = False
    ) -> torch.Tensor:
        """Hypercolumns ``(C, z, y, x)`` of every voxel in ``box`` (slices of the source grid),
        equal to :meth:`sample_grid` on its voxels but without a sampling grid where the
        source grid is the encoded one: full-resolution maps are sliced, and each level is
        upsampled (``F.interpolate``, trilinear) from just the cells around the box."""
        if self.scale != (1.0, 1.0, 1.0) or self.origin != (0, 0, 0):
            return self.sample_grid([torch.arange(s.start, s.stop) for s in box], intensity, depth, filters)
        return torch.cat([m[(slice(None), *box)] if stride == 1 else _upsampled_box(m, stride, box)
                          for m, stride in self._maps(intensity, depth, filters)])


FINE_SIGMA = 4.0
# Voxels per slab of the full-resolution filter bank: its temporaries (the slab extended by
# the halo, ten derivative maps) then stay near 0.3 GB whatever the block.
_FILTER_SLAB_VOXELS = 1 << 21


def _filter_bank_in_slabs(unit: torch.Tensor, sigmas: Sequence[float], sets: Sequence[str]) -> torch.Tensor:
    """``filter_bank(unit, sigmas, sets)[1:]``, computed a slab of planes at a time."""
    halo = filter_halo(sigmas, sets)
    planes = max(2 * halo, _FILTER_SLAB_VOXELS // (unit.shape[1] * unit.shape[2]))
    out = unit.new_empty((len(filter_names(sigmas, sets)) - 1, *unit.shape))
    whole = (slice(None), slice(None))
    for z in range(0, unit.shape[0], planes):
        box = (slice(z, min(z + planes, unit.shape[0])), *whole)
        out[:, box[0]] = filter_box(unit.__getitem__, unit.shape, box, sigmas, sets)[1:]
    return out


def coarse_factor(sigma: float) -> int:
    """The grid stride a filter scale runs at: 1 up to :data:`FINE_SIGMA`, else the power of
    two that brings it back to about :data:`FINE_SIGMA`."""
    return 1 if sigma <= FINE_SIGMA else 2 ** round(math.log2(sigma / FINE_SIGMA))


def _upsampled_box(level: torch.Tensor, stride: int, box: Sequence[slice]) -> torch.Tensor:
    """``F.interpolate(level, scale_factor=stride)[:, box]``, from the cells that ``box`` needs."""
    cells = [slice(max(0, s.start // stride - 1), min(n, s.stop // stride + 2)) for s, n in
             zip(box, level.shape[1:], strict=True)]
    part = F.interpolate(level[(slice(None), *cells)][None], scale_factor=stride, mode="trilinear",
                         align_corners=False)[0]
    crop = tuple(slice(s.start - c.start * stride, s.stop - c.start * stride) for s, c in zip(box, cells, strict=True))
    return part[(slice(None), *crop)]


def _encoded_shape(source_shape: Sequence[int], scale: Sequence[float]) -> tuple[int, int, int]:
    return tuple(max(1, round(n * s)) for n, s in zip(source_shape, scale, strict=True))


def _far_padding(shape: Sequence[int], padded: Sequence[int]) -> list[int]:
    """``F.pad`` widths that extend the last three axes from ``shape`` to ``padded`` at their far end."""
    return [0, padded[2] - shape[2], 0, padded[1] - shape[1], 0, padded[0] - shape[0]]


def _resample(unit: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    return F.interpolate(unit[None, None], size=tuple(shape), mode="trilinear", align_corners=False)[0, 0]


def encode_job(
    model: nn.Module,
    volume,
    stats: IntensityStats,
    *,
    levels: Sequence[int],
    scale: Sequence[float] = (1.0, 1.0, 1.0),
    tile: int | None = None,
    overlap: float = 0.25,
    batch: int = 1,
    multiple: int = 1,
    device: torch.device,
) -> Job[Pyramid]:
    """Run the encoder over ``volume`` in overlapping tiles and blend the levels.

    Yields a :class:`Progress` per batch of tiles. When the device runs out of memory the
    job halves the batch, then shrinks the tile (by a quarter, down to twice the deepest
    stride), then moves to the CPU, says so in a :class:`Progress` message each time, and
    starts over; the caller never sees the error.

    Args:
        model: 3D network with ``forward_features`` and ``feature_info``, in eval mode.
        volume: (Z, Y, X) numpy or memory-mapped array.
        stats: from :func:`napari_crossd.engine.normalize.intensity_stats` on ``volume``.
        levels: indices into ``model.feature_info``.
        scale: encoded voxels per source voxel (:func:`spacing_scale`).
        tile: tile edge in encoded voxels (default :func:`default_tile`).
        overlap: fraction of the tile shared by neighbouring tiles, in [0, 0.9].
        batch: tiles per forward pass.
        multiple: pad the encoded grid to a multiple of this too (coarse filter maps need
            their stride to divide it); a power of two.
        device: where the network runs. The caller's model is never moved or changed (jobs
            in other threads may be using it): it runs as it is when it is already on
            ``device`` in eval mode, else an eval-mode copy on ``device`` does, freed when the
            job ends.

    Returns:
        The :class:`Pyramid` (CPU tensors).
    """
    if not 0 <= overlap <= 0.9:
        raise ValueError(f"overlap must be in [0, 0.9], got {overlap}.")
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}.")
    levels = list(levels)
    strides = [int(model.feature_info[level]["reduction"]) for level in levels]
    deepest = max(strides, default=1)
    tile = tile or default_tile(device, deepest)
    if tile < _MIN_TILE_STRIDES * deepest:
        raise ValueError(f"tile must be at least {_MIN_TILE_STRIDES * deepest} voxels for these levels, got {tile}.")
    tile = math.ceil(tile / deepest) * deepest

    source_shape = tuple(int(n) for n in volume.shape)
    unit = unit_intensity(volume, stats)
    scale = tuple(float(s) for s in scale)
    encoded_shape = _encoded_shape(source_shape, scale)
    if encoded_shape != source_shape:
        unit = _resample(unit, encoded_shape)
    grid = max(deepest, multiple)  # both powers of two
    padded = tuple(math.ceil(n / grid) * grid for n in encoded_shape)
    intensity = F.pad(unit, _far_padding(encoded_shape, padded))
    channels = input_channels(model)
    normalization = model_meta(model).normalization

    if not levels:  # the grey values alone: nothing to run
        return Pyramid([], [], intensity, source_shape, scale, stats=stats)
    levels_out = yield from _tiles_that_fit(
        model, intensity, encoded_shape, stats, normalization, channels, levels, strides, tile, overlap, batch, device
    )
    return Pyramid(levels_out, strides, intensity, source_shape, scale, stats=stats)


def _smaller_run(tile: int, batch: int, device: torch.device, deepest: int) -> tuple | None:
    """After running out of memory: half the batch, else a quarter off the tile (down to
    :data:`_MIN_TILE_STRIDES` deepest strides), else the CPU; None when none is left."""
    if batch > 1:
        return tile, batch // 2, device
    if tile > _MIN_TILE_STRIDES * deepest:
        return max(_MIN_TILE_STRIDES * deepest, (tile * 3 // 4) // deepest * deepest), batch, device
    if device.type != "cpu":
        return tile, batch, torch.device("cpu")
    return None


def _tiles_that_fit(
    model, intensity, encoded_shape, stats, normalization, channels, levels, strides, tile, overlap, batch, device
):
    """:func:`_tiles` with ``model`` on ``device``, started over smaller each time it runs out of memory."""
    runner = network_on(model, device)
    try:
        while True:
            try:
                return (yield from _tiles(runner, intensity, encoded_shape, stats, normalization, channels, levels,
                                          strides, tile, overlap, batch, device))
            except Exception as err:
                if not is_out_of_memory(err):
                    raise
                release_memory(device)
                old = f"tile {tile}, batch {batch} on {device}"
                smaller = _smaller_run(tile, batch, device, max(strides))
                if smaller is None:
                    raise
                if smaller[2] != device:
                    runner = network_on(model, smaller[2])
                    release_memory(smaller[2])
                tile, batch, device = smaller
                yield Progress(
                    0, None, f"out of memory with {old}: retrying with tile {tile}, batch {batch} on {device}",
                    phase="encode",
                )
    finally:
        del runner
        release_memory(device)


def _tiles(
    model, intensity, encoded_shape, stats, normalization, channels, levels, strides, tile, overlap, batch, device
):
    padded = tuple(intensity.shape)
    sizes = [min(tile, n) for n in padded]
    deepest = max(strides)
    steps = [max(deepest, int(size * (1 - overlap)) // deepest * deepest) for size in sizes]
    corners = list(product(*(_starts(n, size, step) for n, size, step in zip(padded, sizes, steps, strict=True))))
    weights = [_gaussian([size // s for size in sizes]) for s in strides]
    sums = [None] * len(levels)
    totals = [torch.zeros([n // s for n in padded]) for s in strides]
    batches = math.ceil(len(corners) / batch)
    for index in range(batches):
        chunk = corners[index * batch : (index + 1) * batch]
        tiles = []
        for z, y, x in chunk:
            region = intensity[z : z + sizes[0], y : y + sizes[1], x : x + sizes[2]]
            tensor = network_input(region, stats, normalization, channels)
            # Beyond the volume the network sees zeros, as its own padding would give it.
            inside = [
                max(0, min(size, n - start)) for size, n, start in zip(sizes, encoded_shape, (z, y, x), strict=True)
            ]
            mask = torch.zeros(sizes, dtype=torch.bool)
            mask[: inside[0], : inside[1], : inside[2]] = True
            tiles.append(tensor * mask)
        with torch.inference_mode(), autocast(device):
            outputs = forward_levels(model, torch.stack(tiles).to(device), levels)
        for li, (out, s) in enumerate(zip(outputs, strides, strict=True)):
            out = out.float().cpu()
            if sums[li] is None:
                sums[li] = torch.zeros((out.shape[1], *(n // s for n in padded)))
            for b, (z, y, x) in enumerate(chunk):
                view = (
                    slice(z // s, (z + sizes[0]) // s),
                    slice(y // s, (y + sizes[1]) // s),
                    slice(x // s, (x + sizes[2]) // s),
                )
                sums[li][(slice(None), *view)] += out[b] * weights[li]
                totals[li][view] += weights[li]
        yield Progress(index + 1, batches, f"encoding tile batch {index + 1}/{batches}", phase="encode")
    return [level_sum / total for level_sum, total in zip(sums, totals, strict=True)]
