"""Voxel features from an inflated encoder: hypercolumns on the volume's grid, and a PCA view."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import dask.array as da
import numpy as np
import torch
from torch import nn

from ..io import load_model
from ..models.inflate import inflate
from ..models.meta import model_meta
from .devices import resolve_device
from .jobs import Job, Progress, run_job
from .normalize import IntensityStats, check_volume, intensity_stats
from .pyramid import Pyramid, default_levels, encode_job, spacing_scale

__all__ = [
    "check_levels",
    "extract_features",
    "feature_channels",
    "features_job",
    "pca_rgb",
    "prepare_model",
    "require_3d",
]

# Hypercolumns are assembled this many values (voxels x channels) at a time: the
# full-resolution stack of a 512^3 volume would not fit in memory, one slab does.
SLAB_VALUES = 1 << 25
# Halo (source voxels) added around each dask block: two strides of the deepest default
# level. Block results then match the whole-volume run to within the tiling tolerance.
DASK_HALO = 16


def prepare_model(
    source: str | nn.Module = "default",
    *,
    arch: str = "auto",
    strategy: str = "i3d",
    official_shift: str = "keep",
) -> nn.Module:
    """A 3D network ready for the engine: loaded (if a path or ``"default"``) and inflated (if 2D).

    Args:
        source: checkpoint path, ``"default"``, or a network (2D or already inflated).
        arch: architecture of a checkpoint (``"auto"``: detected).
        strategy: inflation strategy for 2D weights (see :func:`napari_crossd.inflate`).
        official_shift: for official Cross-D checkpoints (see :func:`napari_crossd.inflate`).

    Returns:
        The 3D network in eval mode, with ``crossd_meta``.
    """
    model = source if isinstance(source, nn.Module) else load_model(source, arch=arch)
    if model_meta(model).spatial_dims != 3:
        model = inflate(model, strategy=strategy, official_shift=official_shift)
    return model.eval()


def require_3d(model: nn.Module) -> None:
    """Raise a ValueError unless ``model`` is an inflated network with multi-scale features."""
    if not hasattr(model, "feature_info") or not hasattr(model, "forward_features"):
        raise ValueError(
            f"{type(model).__name__} has no forward_features/feature_info: use a backbone from "
            "napari_crossd.models (build_model, load_model)."
        )
    if model_meta(model).spatial_dims != 3:
        raise ValueError(
            "The model is 2D: inflate it first (napari_crossd.engine.prepare_model or napari_crossd.inflate)."
        )


def feature_channels(model: nn.Module, levels: Sequence[int]) -> int:
    return sum(model.feature_info[level]["num_chs"] for level in levels)


def check_levels(model: nn.Module, levels: Sequence[int] | None) -> list[int]:
    """``levels`` sorted and checked against ``model.feature_info`` (None: :func:`default_levels`)."""
    if levels is None:
        return default_levels(model)
    levels = sorted(set(int(level) for level in levels))
    if not levels or levels[0] < 0 or levels[-1] >= len(model.feature_info):
        raise ValueError(f"levels must be indices in 0..{len(model.feature_info) - 1}, got {levels}.")
    return levels


def _grid_axes(shape: Sequence[int], stride: int) -> list[torch.Tensor]:
    # The centre of each stride-cube (clipped to the last voxel for a partial cube).
    return [torch.clamp(torch.arange(0, n, stride, dtype=torch.float32) + (stride - 1) / 2, max=n - 1) for n in shape]


def hypercolumn_slabs(pyramid: Pyramid, stride: int, intensity: bool, depth: int | None = None, transform=None):
    """Yield ``(index, count, z_slice, block)`` over the output grid, a slab at a time.

    ``block`` holds the hypercolumns ``(C, z, Y', X')`` (see :meth:`Pyramid.sample`), or
    ``transform`` of them; ``count`` is the number of slabs.
    """
    z, y, x = _grid_axes(pyramid.source_shape, stride)
    per_slice = pyramid.channels(intensity, depth) * len(y) * len(x)
    thickness = max(1, SLAB_VALUES // per_slice)
    count = math.ceil(len(z) / thickness)
    for index, start in enumerate(range(0, len(z), thickness)):
        axes = (z[start : start + thickness], y, x)
        block = pyramid.sample_grid(axes, intensity=intensity, depth=depth)
        yield index, count, slice(start, start + thickness), block if transform is None else transform(block)


def hypercolumns_job(
    model, volume, stats: IntensityStats, *, levels, stride, scale, tile, overlap, batch, device
) -> Job[np.ndarray]:
    """:func:`features_job` of ``volume`` normalised with ``stats`` (measured on the volume it
    is a part of), checked arguments, numpy only."""
    pyramid = yield from encode_job(
        model, volume, stats, levels=levels, scale=scale, tile=tile, overlap=overlap, batch=batch, device=device
    )
    out_shape = [math.ceil(n / stride) for n in volume.shape]
    features = np.empty((pyramid.channels(), *out_shape), dtype=np.float32)
    for index, count, z, block in hypercolumn_slabs(pyramid, stride, intensity=False):
        features[:, z] = block.numpy()
        yield Progress(index + 1, count, f"hypercolumns, slab {index + 1}/{count}", phase="hypercolumns")
    return features


def features_job(
    model: nn.Module,
    volume,
    *,
    spacing: Sequence[float] | None = None,
    resample: bool | None = None,
    levels: Sequence[int] | None = None,
    stride: int = 1,
    preset: str = "auto",
    tile: int | None = None,
    overlap: float = 0.25,
    batch: int = 1,
    device: str | torch.device = "auto",
):
    """Hypercolumn features of a volume: every level upsampled to the volume's grid and stacked.

    Convention:
        Output axes (C, Z, Y, X), channels grouped by level, finest first (e.g. 16 + 24 +
        32 = 72 for MobileNetV2's default levels at strides 2, 4, 8). ``stride`` > 1 gives
        one vector per ``stride``-cube (sampled at its centre), shape ``ceil(n / stride)``.
        Features come from tiles blended as described in :mod:`.pyramid`; values near the
        volume's faces saw the network's zero padding. NaN/Inf voxels raise ValueError.

    Args:
        model: inflated 3D network (:func:`prepare_model`).
        volume: (Z, Y, X) numpy, memory-mapped or dask array.
        spacing: voxel size (Z, Y, X); strongly anisotropic volumes are resampled to
            isotropic voxels for the network and the features sampled back on this grid.
        resample: force (True) or forbid (False) that resampling.
        levels: indices into ``model.feature_info`` (default: strides up to 8).
        stride: output stride on the volume's grid.
        preset: intensity normalisation (:data:`napari_crossd.engine.normalize.PRESETS`).
        tile, overlap, batch: sliding-window settings (:func:`.pyramid.encode_job`).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"``.

    Returns:
        ``(C, Z', Y', X')`` float32 numpy array; for a dask ``volume`` a lazy dask array
        computed block by block with a halo of :data:`DASK_HALO` voxels (``stride`` 1 only).

    Example:
        >>> import numpy as np, torch
        >>> from napari_crossd import build_model, inflate
        >>> from napari_crossd.engine import extract_features
        >>> model = inflate(build_model("mobilenet_v2")).eval()
        >>> extract_features(model, np.random.rand(20, 24, 28), device="cpu").shape
        (72, 20, 24, 28)
    """
    require_3d(model)
    check_volume(volume)
    levels = check_levels(model, levels)
    if not (isinstance(stride, int) and stride >= 1):
        raise ValueError(f"stride must be a positive integer, got {stride!r}.")
    device = resolve_device(device)
    stats = intensity_stats(volume, preset)
    scale = spacing_scale(spacing, resample)
    settings = dict(levels=levels, scale=scale, tile=tile, overlap=overlap, batch=batch, device=device)
    if isinstance(volume, da.Array):
        if stride != 1:
            raise ValueError("Lazy (dask) feature extraction works on the volume's own grid: use stride=1.")
        return lazy_blocks(
            volume,
            feature_channels(model, levels),
            lambda block: run_job(hypercolumns_job(model, block, stats, stride=1, **settings)),
        )
    return (yield from hypercolumns_job(model, volume, stats, stride=stride, **settings))


def lazy_blocks(
    volume: da.Array, channels: int, compute: Callable[[np.ndarray], np.ndarray], dtype=np.float32,
    halo: int = DASK_HALO,
) -> da.Array:
    """``compute`` (a (Z, Y, X) block -> (channels, Z, Y, X)) mapped over ``volume`` with a halo, lazily."""
    depth = {axis: min(halo, *(c for c in volume.chunks[axis])) for axis in range(3)}
    padded = da.overlap.overlap(volume, depth=depth, boundary="none")
    out = padded.map_blocks(compute, new_axis=0, chunks=((channels,), *padded.chunks), dtype=dtype)
    return da.overlap.trim_internal(out, {0: 0, 1: depth[0], 2: depth[1], 3: depth[2]}, boundary="none")


def extract_features(model: nn.Module, volume, *, progress: Callable[[Progress], None] | None = None, **kwargs):
    """:func:`features_job` run to the end; ``progress`` receives each :class:`Progress`."""
    return run_job(features_job(model, volume, **kwargs), progress)


def pca_rgb(features, *, samples: int = 200_000, seed: int = 0) -> np.ndarray:
    """Project ``(C, Z, Y, X)`` features on their first three principal components, as RGB.

    The components are fitted on at most ``samples`` random voxels; each is signed so that
    its largest loading is positive (deterministic colours) and scaled so that its 1st..99th
    percentiles span [0, 1].

    Returns:
        ``(Z, Y, X, 3)`` float32 in [0, 1].
    """
    features = np.asarray(features)
    if features.ndim != 4:
        raise ValueError(f"Expected features (C, Z, Y, X), got shape {features.shape}.")
    if features.shape[0] < 3:
        raise ValueError(f"PCA to RGB needs at least 3 feature channels, got {features.shape[0]}.")
    flat = torch.from_numpy(features.reshape(features.shape[0], -1)).float()
    generator = torch.Generator().manual_seed(seed)
    picked = flat[:, torch.randperm(flat.shape[1], generator=generator)[:samples]]
    mean = picked.mean(1, keepdim=True)
    _, _, vh = torch.linalg.svd((picked - mean).T, full_matrices=False)
    components = vh[:3]
    components *= torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True)))
    projected = components @ (flat - mean)
    low = torch.quantile(projected[:, torch.randperm(projected.shape[1], generator=generator)[:samples]], 0.01, dim=1)
    high = torch.quantile(projected[:, torch.randperm(projected.shape[1], generator=generator)[:samples]], 0.99, dim=1)
    rgb = ((projected - low[:, None]) / (high - low).clamp_min(1e-12)[:, None]).clamp(0, 1)
    return rgb.T.reshape(*features.shape[1:], 3).numpy()
