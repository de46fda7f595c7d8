"""End-to-end fine-tuning of the encoder on crops around painted strokes (``finetune(full=True)``).

The frozen encoder's features feed a forest; this step adapts the encoder itself first, for
when its pretrained features do not separate the classes at all (a new modality, a texture
ImageNet never saw). A linear head on each painted voxel's grey value and encoder levels is
trained jointly with the encoder on crops of the volume, with whole painted planes held out
to keep the best encoder; the forest is then refit on the new encoder's features.
BatchNorm statistics stay those of the pretraining (a handful of crops would corrupt them).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models.inspect import input_channels
from .annotations import Annotations
from .devices import autocast
from .features import feature_channels
from .jobs import Job, Progress
from .normalize import IntensityStats, intensity_stats, network_input, unit_intensity
from .pyramid import Pyramid, _encoded_shape, _far_padding, _resample, forward_levels, spacing_scale
from .pyramid import default_levels as _default_levels

__all__ = ["tune_encoder_job"]

_EVAL_EVERY = 10


class _Crops:
    """Crops of the volume around painted voxels, encoded by a (training) encoder."""

    def __init__(self, volume, stats: IntensityStats, scale, crop: int, levels: list[int], encoder: nn.Module):
        self.volume, self.stats, self.scale, self.levels = volume, stats, scale, levels
        self.strides = [int(encoder.feature_info[level]["reduction"]) for level in levels]
        deepest = max(self.strides)
        self.size = [min(n, max(deepest, math.ceil(crop / s))) for n, s in zip(volume.shape, scale, strict=True)]
        self.channels = input_channels(encoder)
        self.normalization = encoder.crossd_meta.normalization

    def box(self, centre: np.ndarray) -> tuple[slice, ...]:
        starts = [int(min(max(0, c - n // 2), total - n)) for c, n, total in zip(centre, self.size, self.volume.shape,
                                                                                  strict=True)]
        return tuple(slice(s, s + n) for s, n in zip(starts, self.size, strict=True))

    def columns(self, encoder, box, points: np.ndarray, device, gain: float = 1.0, offset: float = 0.0):
        """Grey value and levels ``(P, C)`` at ``points`` (source voxels inside ``box``)."""
        unit = unit_intensity(np.asarray(self.volume[box]), self.stats) * gain + offset
        source_shape = tuple(unit.shape)
        encoded = _encoded_shape(source_shape, self.scale)
        if encoded != source_shape:
            unit = _resample(unit, encoded)
        deepest = max(self.strides)
        padded = tuple(math.ceil(n / deepest) * deepest for n in encoded)
        intensity = F.pad(unit, _far_padding(encoded, padded))
        x = network_input(intensity, self.stats, self.normalization, self.channels)
        with autocast(device):
            levels = forward_levels(encoder, x[None].to(device), self.levels)
        pyramid = Pyramid([level[0].float() for level in levels], self.strides, intensity.to(device), source_shape,
                          self.scale)
        offset_ = np.array([s.start for s in box])
        return pyramid.sample(torch.from_numpy(points - offset_), intensity=True)


def _inside(coords: np.ndarray, box) -> np.ndarray:
    return np.all([(coords[:, a] >= box[a].start) & (coords[:, a] < box[a].stop) for a in range(3)], axis=0)


def _crop_loss(encoder, head, crops: _Crops, annotations: Annotations, centre, device, rng=None) -> torch.Tensor:
    box = crops.box(centre)
    inside = _inside(annotations.coords, box)
    gain, offset = (1.0, 0.0) if rng is None else (0.9 + 0.2 * rng.random(), 0.1 * (rng.random() - 0.5))
    columns = crops.columns(encoder, box, annotations.coords[inside], device, gain, offset)
    targets = torch.from_numpy(annotations.classes[inside] - 1).to(device)
    counts = torch.bincount(targets, minlength=annotations.num_classes).float()
    weight = torch.where(counts > 0, 1 / counts.clamp_min(1), torch.zeros_like(counts))
    return F.cross_entropy(head(columns), targets, weight=weight)


def _split(annotations: Annotations, rng: np.random.Generator) -> tuple[Annotations, Annotations]:
    groups = annotations.groups()
    unique = rng.permutation(np.unique(groups))
    for count in range(max(1, len(unique) // 5), 0, -1):
        held = np.isin(groups, unique[:count])
        train_classes = set(annotations.classes[~held].tolist())
        if held.any() and train_classes == set(annotations.painted_classes):
            pick = lambda m: Annotations(annotations.coords[m], annotations.classes[m], annotations.shape,  # noqa: E731
                                         annotations.num_classes)
            return pick(~held), pick(held)
    return annotations, annotations


def tune_encoder_job(
    encoder: nn.Module,
    volume,
    annotations: Annotations,
    preset: str,
    *,
    steps: int = 150,
    crop: int = 64,
    lr: float = 1e-4,
    patience: int = 60,
    spacing: Sequence[float] | None = None,
    resample: bool | None = None,
    device: torch.device,
    seed: int = 0,
    **_window,
) -> Job[tuple[nn.Module, dict]]:
    """Fine-tune a copy of ``encoder`` on ``crop``-voxel crops around the strokes.

    Each step encodes one crop centred on a painted voxel of a randomly chosen class and
    takes an AdamW step on the cross-entropy of a linear head over every painted voxel in
    it (classes weighted equally). Every 10 steps the held-out planes' loss decides whether
    the encoder improved; training stops after ``patience`` steps without improvement.

    Yields:
        :class:`Progress` per step, ``phase="encoder"``, with the step's ``loss``.

    Returns:
        ``(encoder, summary)``: the best encoder (a new module, CPU, eval mode) and
        ``{"steps", "best_step", "best_loss", "stopped_early"}``.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}.")
    rng = np.random.default_rng(seed)
    train, held = _split(annotations, rng)
    levels = _default_levels(encoder)
    tuned = copy.deepcopy(encoder).to(device).requires_grad_(True)
    crops = _Crops(volume, intensity_stats(volume, preset), spacing_scale(spacing, resample), crop, levels, tuned)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(1 + feature_channels(encoder, levels), annotations.num_classes).to(device)
    optimizer = torch.optim.AdamW([{"params": head.parameters(), "lr": lr * 100}, {"params": tuned.parameters()}],
                                  lr=lr, weight_decay=1e-4)
    best = {"loss": math.inf, "step": 0, "encoder": copy.deepcopy(encoder)}
    since_best, stopped_early = 0, False
    centres = held.coords[rng.permutation(len(held))[:4]]
    for step in range(1, steps + 1):
        tuned.eval()  # BatchNorm statistics stay; the weights still learn
        cls = rng.choice(train.painted_classes)
        candidates = np.flatnonzero(train.classes == cls)
        loss = _crop_loss(tuned, head, crops, train, train.coords[rng.choice(candidates)], device, rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == 1 or step % _EVAL_EVERY == 0 or step == steps:
            with torch.no_grad():
                val = float(np.mean([_crop_loss(tuned, head, crops, held, c, device).item() for c in centres]))
            if val < best["loss"]:
                best = {"loss": val, "step": step, "encoder": copy.deepcopy(tuned).cpu().eval().requires_grad_(False)}
                since_best = 0
            else:
                since_best += _EVAL_EVERY
        yield Progress(step, steps, f"encoder fine-tuning, step {step}/{steps}: loss {loss.item():.4f}; best "
                       f"held-out loss {best['loss']:.4f}", loss=loss.item(), phase="encoder")
        if since_best >= patience:
            stopped_early = True
            break
    summary = {"steps": step, "best_step": best["step"], "best_loss": best["loss"], "stopped_early": stopped_early}
    return best["encoder"], summary
