"""Intensity normalisation: raw voxel values -> what a 2D-pretrained network expects.

Convention:
    Two stages. :func:`intensity_stats` looks at the whole volume once (percentiles, a HU
    window, mean and standard deviation) and returns :class:`IntensityStats`;
    :func:`network_input` applies them to any block of the volume, so that tiles, dask
    blocks and the whole volume are normalised identically. Presets:

    * ``"ct"``: Hounsfield units clipped to a window (default -1000..1000 HU), scaled to
      [0, 1], then the checkpoint's mean/std.
    * ``"mr"``: clipped to the 0.5th..99.5th percentiles, then z-scored (mean 0, std 1 over
      the volume); the checkpoint's mean/std is not applied on top (a z-scored volume is
      already centred the way normalised network input is).
    * ``"microscopy"``: clipped to the 1st..99.8th percentiles and scaled to [0, 1], then
      the checkpoint's mean/std.
    * ``"checkpoint"``: scaled to [0, 1] as the checkpoint's training images were
      (``uint8`` divided by 255, anything else min-max), then its mean/std.
    * ``"auto"``: ``"ct"`` for signed data reaching below -500 (Hounsfield units), else
      ``"microscopy"`` (robust to hot pixels and to MR intensity tails).

    Grey volumes are repeated over the network's input channels (3 for ImageNet stems),
    each channel normalised with its own mean/std. NaN and infinite voxels are an error:
    fill or mask them first (``numpy.nan_to_num``); the engine never guesses a value for
    them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from ..models.inspect import input_channels
from ..models.meta import Normalization, model_meta

__all__ = ["PRESETS", "IntensityStats", "check_volume", "intensity_stats", "network_input", "network_volume"]

PRESETS = ("auto", "ct", "mr", "microscopy", "checkpoint")
CT_WINDOW = (-1000.0, 1000.0)
_PERCENTILES = {"mr": (0.5, 99.5), "microscopy": (1.0, 99.8)}
# Percentiles of bigger volumes come from a regular subsample of about this many voxels:
# exact enough for a clipping range, and a 512^3 volume is not read twice in full.
_STATS_VOXELS = 1 << 24


@dataclass(frozen=True)
class IntensityStats:
    """How one volume's raw values map to [0, 1] (or to z-scores for ``"mr"``)."""

    preset: str
    low: float
    high: float
    mean: float = 0.0
    std: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)


def check_volume(volume, name: str = "volume") -> None:
    """Raise a ValueError naming what is wrong unless ``volume`` is a single-channel 3D array.

    Checks the shape and dtype of numpy, memory-mapped and dask arrays without reading
    voxels. NaN/Inf voxels are found where the values are read anyway: by
    :func:`intensity_stats` (its sample is the whole volume up to 2^24 voxels) and by
    :func:`unit_intensity` (every voxel the network sees, dask blocks as they load).
    """
    shape = tuple(getattr(volume, "shape", ()))
    dtype = getattr(volume, "dtype", None)
    if len(shape) == 4 and shape[-1] in (3, 4):
        raise ValueError(
            f"The {name} looks like an RGB(A) volume, shape {shape}; expected one channel (Z, Y, X). "
            "Convert it to grey values first."
        )
    if len(shape) != 3:
        raise ValueError(f"Expected a 3D {name} (Z, Y, X), got shape {shape}.")
    if min(shape) < 1:
        raise ValueError(f"The {name} is empty, shape {shape}.")
    if dtype is None or not (np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.bool_)):
        raise ValueError(f"Expected a numeric {name}, got dtype {dtype}.")
    if np.issubdtype(dtype, np.complexfloating):
        raise ValueError(f"Expected a real-valued {name}, got dtype {dtype}.")


def _check_finite(block: np.ndarray, name: str) -> None:
    if np.issubdtype(block.dtype, np.floating) and not np.isfinite(block).all():
        nans = int(np.isnan(block).sum())
        infs = int(np.isinf(block).sum())
        raise ValueError(
            f"The {name} contains {nans} NaN and {infs} infinite voxels; fill or mask them first "
            "(for example numpy.nan_to_num(volume, nan=0.0)): the network cannot use them."
        )


def _subsample(volume) -> np.ndarray:
    step = max(1, round((np.prod(volume.shape) / _STATS_VOXELS) ** (1 / 3)))
    sample = volume[::step, ::step, ::step]
    if hasattr(sample, "compute"):
        sample = sample.compute()
    sample = np.asarray(sample)
    _check_finite(sample, "volume")
    return sample


def intensity_stats(volume, preset: str = "auto", window: tuple[float, float] | None = None) -> IntensityStats:
    """Measure what the normalisation of ``volume`` needs (see the module's Convention).

    Args:
        volume: (Z, Y, X) numpy, memory-mapped or dask array.
        preset: one of :data:`PRESETS`.
        window: the HU window of ``"ct"`` (default -1000..1000).

    Returns:
        The statistics; apply them with :func:`network_input`.
    """
    if preset not in PRESETS:
        raise ValueError(f"Unknown normalisation preset {preset!r}; expected one of {', '.join(PRESETS)}.")
    check_volume(volume)
    sample = _subsample(volume)
    if preset == "auto":
        signed = np.issubdtype(sample.dtype, np.signedinteger) or np.issubdtype(sample.dtype, np.floating)
        preset = "ct" if signed and float(sample.min()) < -500 else "microscopy"
    if preset == "ct":
        low, high = window or CT_WINDOW
        if not high > low:
            raise ValueError(f"The CT window must have high > low, got {window}.")
        return IntensityStats("ct", float(low), float(high))
    if preset == "checkpoint":
        if sample.dtype == np.uint8:
            return IntensityStats("checkpoint", 0.0, 255.0)
        low, high = float(sample.min()), float(sample.max())
    else:
        low, high = (float(v) for v in np.percentile(sample, _PERCENTILES[preset]))
    if not high > low:
        # A constant volume (or one that is constant but for a few voxels): nothing to scale.
        high = low + 1.0
    if preset == "mr":
        clipped = np.clip(sample.astype(np.float64), low, high)
        return IntensityStats("mr", low, high, float(clipped.mean()), float(clipped.std()) or 1.0)
    return IntensityStats(preset, low, high)


def unit_intensity(block, stats: IntensityStats) -> torch.Tensor:
    """``block`` (any shape) in [0, 1] (z-scores for ``"mr"``) as a float32 tensor."""
    values = np.asarray(block)
    _check_finite(values, "volume")
    tensor = torch.as_tensor(values.astype(np.float32, copy=False))
    tensor = tensor.clamp(stats.low, stats.high)
    if stats.preset == "mr":
        return (tensor - stats.mean) / stats.std
    return (tensor - stats.low) / (stats.high - stats.low)


def network_input(
    unit: torch.Tensor, stats: IntensityStats, normalization: Normalization | None, channels: int
) -> torch.Tensor:
    """Network input ``(channels, *unit.shape)`` from :func:`unit_intensity` values.

    Args:
        unit: normalised grey values, any shape.
        stats: the volume's statistics (``"mr"`` skips the checkpoint's mean/std).
        normalization: ``model.crossd_meta.normalization`` (``mean`` and ``std``, one
            per input channel), or None for none.
        channels: input channels of the network's stem.
    """
    stacked = unit.unsqueeze(0).expand(channels, *unit.shape)
    if stats.preset == "mr" or not normalization:
        return stacked.contiguous()
    mean = torch.tensor(normalization.mean, dtype=unit.dtype)
    std = torch.tensor(normalization.std, dtype=unit.dtype)
    if mean.numel() != channels:
        mean, std = mean.mean().expand(channels), std.mean().expand(channels)
    view = (channels,) + (1,) * unit.dim()
    return (stacked - mean.view(view)) / std.view(view)


def network_volume(volume, model: nn.Module, preset: str = "auto") -> torch.Tensor:
    """A (Z, Y, X) volume as ``model``'s (C, Z, Y, X) input, normalised as the engine does.

    The engine's own two stages (:func:`intensity_stats` over the whole volume, then
    :func:`network_input`) with
    the checkpoint's normalisation from ``model.crossd_meta``, repeated over the stem's
    input channels. ValueError (from the engine) for non-3D, RGB or non-finite volumes.
    """
    stats = intensity_stats(volume, preset)
    normalization = model_meta(model).normalization
    return network_input(unit_intensity(np.asarray(volume), stats), stats, normalization, input_channels(model))
