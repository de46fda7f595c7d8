"""Segmentation from painted strokes: a voxel classifier on the encoder's hypercolumns.

Convention:
    Label volumes have the image's shape (Z, Y, X): 0 means "not annotated", 1..N are
    classes. Predictions give every voxel a class 1..N and per-class probabilities
    (N, Z, Y, X) float16. The classifier (:class:`PointHead`) is a two-layer MLP applied
    to each voxel's hypercolumn (normalised grey value, Gaussian-smoothed copies of it and
    encoder levels, trilinearly interpolated), so it trains on the annotated voxels alone
    and predicts a whole volume slab by slab.

With a frozen encoder (the default) the encoder runs once per volume and its features
are cached: training touches only the few thousand annotated hypercolumns, and a second
round of training after more strokes reuses both the features and the head (warm start).
``full=True`` fine-tunes the encoder too, on crops around the strokes.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import dask.array as da
import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from .devices import autocast, release_memory, resolve_device
from .features import check_levels, feature_channels, hypercolumn_slabs, lazy_blocks, require_3d
from .jobs import Job, Progress, run_job
from .normalize import PRESETS, check_volume, intensity_stats, network_input
from .pyramid import Pyramid, encode_job, forward_levels, input_channels, spacing_scale

__all__ = [
    "PointHead",
    "Segmenter",
    "finetune",
    "finetune_job",
    "load_segmenter",
    "save_segmenter",
    "segment",
    "segment_job",
]

SEGMENTER_FILE = "segmenter.json"
HEAD_FILE = "head.safetensors"
ENCODER_FILE = "encoder.safetensors"
_VALIDATION_BLOCK = 8  # see _held_out
# Gaussian sigmas (encoded voxels) of the smoothed grey values in every hypercolumn. The
# encoder's finest level has stride 2; these carry full-resolution context. On the confocal
# nuclei from scribbles (benchmarks/finetune_scribbles.py) a random forest on smoothed grey
# values alone reached Dice 0.93, on our encoder levels alone 0.76.
SMOOTHING_SIGMAS = (1.0, 2.0, 4.0)
_EVAL_EVERY = 10
# Sampling points move by up to a quarter voxel: half a voxel blurred the grey value
# enough to cost 0.02-0.04 Dice on thin grey matter (MNI152 benchmark).
_JITTER = 0.25


class PointHead(nn.Module):
    """Classifier of single hypercolumns: standardise, Linear, ReLU, Dropout, Linear.

    Args:
        in_channels: hypercolumn length C.
        num_classes: N.
        hidden: width of the hidden layer.
    """

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 64, dropout: float = 0.1) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_channels))
        self.register_buffer("std", torch.ones(in_channels))
        self.mlp = nn.Sequential(
            nn.Linear(in_channels, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
        )

    def fit_statistics(self, columns: torch.Tensor) -> None:
        """Set the standardisation from training hypercolumns ``(P, C)``."""
        self.mean.copy_(columns.mean(0))
        self.std.copy_(columns.std(0).clamp_min(1e-6))

    def forward(self, columns: torch.Tensor) -> torch.Tensor:
        """Logits ``(P, N)`` for hypercolumns ``(P, C)``."""
        return self.mlp((columns - self.mean) / self.std)

    def forward_grid(self, block: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, Z, Y, X)`` for hypercolumns ``(C, Z, Y, X)``."""
        flat = block.flatten(1).T
        return self(flat).T.reshape(-1, *block.shape[1:])


class Segmenter(nn.Module):
    """An inflated encoder and a :class:`PointHead` on its hypercolumns.

    Args:
        encoder: 3D network (:func:`napari_crossd.engine.prepare_model`).
        classes: number of classes N (>= 2), or their names in label order (label 1 first).
        levels: encoder levels in the hypercolumn (default: strides up to 8).
        preset: intensity normalisation (:data:`napari_crossd.engine.normalize.PRESETS`).
        hidden: width of the head's hidden layer.
        smoothing: Gaussian sigmas (encoded voxels) of the smoothed grey values a hypercolumn
            may hold beside the raw one (:attr:`smooth` says whether the head uses them);
            ``()`` for none.
    """

    def __init__(
        self,
        encoder: nn.Module,
        classes: int | Sequence[str],
        *,
        levels: Sequence[int] | None = None,
        preset: str = "auto",
        hidden: int = 64,
        smoothing: Sequence[float] = SMOOTHING_SIGMAS,
    ) -> None:
        super().__init__()
        require_3d(encoder)
        if preset not in PRESETS:
            raise ValueError(f"Unknown normalisation preset {preset!r}; expected one of {', '.join(PRESETS)}.")
        names = [f"class {i}" for i in range(1, classes + 1)] if isinstance(classes, int) else [str(c) for c in classes]
        if len(names) < 2:
            raise ValueError(f"A segmenter needs at least 2 classes, got {len(names)}.")
        self.encoder = encoder.eval()
        self.levels = check_levels(encoder, levels)
        self.class_names = names
        self.preset = preset
        self.hidden = hidden
        if any(sigma <= 0 for sigma in smoothing):
            raise ValueError(f"smoothing sigmas must be positive, got {tuple(smoothing)}.")
        self.smoothing = tuple(float(sigma) for sigma in smoothing)
        self.smooth = bool(self.smoothing)
        self.depth = len(self.levels)
        self.head = self.new_head(self.depth, self.smooth)
        self.trained_steps = 0
        self._cache: tuple[tuple, list[int], Pyramid] | None = None
        self._encoder_revision = 0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def new_head(self, depth: int, smooth: bool) -> PointHead:
        """An untrained head on the grey value, its smoothed copies if ``smooth``, and the first ``depth`` levels."""
        channels = 1 + len(self.smoothing) * smooth + feature_channels(self.encoder, self.levels[:depth])
        return PointHead(channels, self.num_classes, self.hidden)

    def use_head(self, head: PointHead, depth: int, smooth: bool) -> None:
        """Make ``head`` (see :meth:`new_head`) the segmenter's classifier."""
        self.head = head
        self.depth = depth
        self.smooth = smooth

    @property
    def hypercolumn(self) -> str:
        """What the head reads at each voxel, e.g. ``"depth 1 + smoothed"``: the grey value,
        its smoothed copies (``+ smoothed``) and the first ``depth`` encoder levels."""
        return _hypercolumn_name(self.depth, self.smooth)

    def config(self) -> dict:
        """What :func:`load_segmenter` needs besides the weights (JSON-serialisable)."""
        return {
            "format": "napari-crossd segmenter",
            "version": 1,
            "class_names": self.class_names,
            "levels": self.levels,
            "depth": self.depth,
            "preset": self.preset,
            "hidden": self.hidden,
            "smoothing": list(self.smoothing),
            "smooth": self.smooth,
            "trained_steps": self.trained_steps,
            "encoder": dict(self.encoder.crossd_meta),
        }

    def pyramid_job(
        self, volume, *, levels=None, smoothed=False, spacing=None, resample=None, tile=None, overlap=0.25, batch=1,
        device,
    ) -> Job[Pyramid]:
        """The encoder's ``levels`` (default: all of :attr:`levels`) of ``volume``, and its
        grey values smoothed at :attr:`smoothing` if ``smoothed``.

        The last pyramid is cached: the same volume with the same settings (and the encoder
        unchanged) comes back without running the encoder again.
        """
        check_volume(volume)
        levels = self.levels if levels is None else list(levels)
        stats = intensity_stats(volume, self.preset)
        key = (_fingerprint(volume), stats, spacing_scale(spacing, resample), tile, overlap, self._encoder_revision)
        if self._cache is not None and self._cache[0] == key and self._cache[1][: len(levels)] == levels:
            yield Progress(1, 1, "encoder features reused from the cache")
        else:
            self._cache = None  # a stale pyramid can be large: free it before computing the next
            pyramid = yield from encode_job(
                self.encoder,
                volume,
                stats,
                levels=levels,
                scale=key[2],
                tile=tile,
                overlap=overlap,
                batch=batch,
                device=device,
            )
            self._cache = (key, levels, pyramid)
        key, cached_levels, pyramid = self._cache
        if smoothed and pyramid.smoothed is None:
            yield Progress(0, None, "smoothing the grey values")
            pyramid = pyramid.with_smoothing(self.smoothing)
            self._cache = (key, cached_levels, pyramid)
        depth = len(levels)
        return dataclasses.replace(pyramid, levels=pyramid.levels[:depth], strides=pyramid.strides[:depth])


def _hypercolumn_name(depth: int, smooth: bool) -> str:
    return f"depth {depth}" + (" + smoothed" if smooth else "")


def _fingerprint(volume) -> tuple:
    array = np.ascontiguousarray(volume)
    return (array.shape, str(array.dtype), hashlib.blake2b(array.data, digest_size=16).hexdigest())


def _check_labels(labels, volume_shape: tuple, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != tuple(volume_shape):
        raise ValueError(f"The labels have shape {labels.shape}; expected the image's shape {tuple(volume_shape)}.")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise ValueError(f"Expected integer labels (0 = not annotated, 1..N = classes), got dtype {labels.dtype}.")
    present = np.unique(labels)
    present = present[present != 0]
    if present.size and (present.min() < 0 or present.max() > num_classes):
        raise ValueError(
            f"Labels must be 0 (not annotated) or 1..{num_classes} for this model's {num_classes} classes; "
            f"found {present.min()}..{present.max()}."
        )
    if present.size == 0:
        raise ValueError(
            "The labels have no annotated voxels: paint strokes of at least two classes (0 = not annotated)."
        )
    if present.size == 1:
        raise ValueError(
            f"Only class {int(present[0])} is annotated: paint strokes of at least two classes so there is "
            "something to tell apart."
        )
    return labels


def _annotated_points(labels: np.ndarray, max_points: int, rng: np.random.Generator):
    """Coordinates ``(P, 3)`` and classes (0-based) of annotated voxels, at most ``max_points``, class-balanced."""
    coords = np.argwhere(labels > 0)
    classes = labels[tuple(coords.T)].astype(np.int64) - 1
    present = np.unique(classes)
    cap = max_points // len(present)
    keep = []
    for c in present:
        index = np.flatnonzero(classes == c)
        keep.append(index if index.size <= cap else rng.choice(index, cap, replace=False))
    keep = np.sort(np.concatenate(keep))
    return coords[keep], classes[keep]


def _held_out(coords: np.ndarray, classes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Which annotated voxels validate instead of train.

    People paint on 2D slices and want the model to work on the slices they did not
    paint, so when the strokes lie on a few slices (along the axis with fewest painted
    planes) a fifth of those slices, at least one, is held out whole. Otherwise (strokes
    drawn in 3D) a fifth of the 8^3 blocks holding strokes: neighbouring voxels of one
    stroke are near copies, so a voxel-wise split would validate on the training set.
    Returns all False when no split leaves every class in training.
    """
    present = np.unique(classes)

    def usable(held: np.ndarray) -> bool:
        return held.any() and all((~held & (classes == c)).any() for c in present)

    planes = [np.unique(coords[:, axis]) for axis in range(3)]
    axis = int(np.argmin([len(p) for p in planes]))
    if 2 <= len(planes[axis]) <= 64:
        order = rng.permutation(planes[axis])
        for count in range(max(1, len(order) // 5), 0, -1):
            held = np.isin(coords[:, axis], order[:count])
            if usable(held):
                return held
    blocks = coords // _VALIDATION_BLOCK
    block_id = (blocks[:, 0] * 73856093) ^ (blocks[:, 1] * 19349663) ^ (blocks[:, 2] * 83492791)
    held = (block_id + int(rng.integers(5))) % 5 == 0
    return held if usable(held) else np.zeros(len(coords), dtype=bool)


def _class_batches(classes: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of a batch with the same number of voxels of every class (class balancing)."""
    present = classes.unique()
    per_class = max(1, size // len(present))
    picks = []
    for c in present:
        index = torch.nonzero(classes == c).flatten()
        picks.append(index[torch.randint(index.numel(), (per_class,), generator=generator)])
    return torch.cat(picks)


def finetune_job(
    segmenter: Segmenter,
    volume,
    labels,
    *,
    spacing: Sequence[float] | None = None,
    resample: bool | None = None,
    steps: int = 300,
    full: bool = False,
    select_depth: bool = True,
    lr: float | None = None,
    batch_points: int = 4096,
    patience: int = 60,
    max_points: int = 200_000,
    crop: int = 64,
    tile: int | None = None,
    overlap: float = 0.25,
    device: str | torch.device = "auto",
    seed: int = 0,
) -> Job[dict]:
    """Train ``segmenter`` on the annotated voxels of ``labels``.

    Losses are cross-entropy on annotated voxels only, each batch holding as many voxels of
    every class as of any other (class balancing). Augmentation: sampling points jittered
    by up to a quarter voxel (frozen encoder); random flips and grey-value gain/offset of crops
    (``full``). Some painted slices (or 8^3 blocks) are held out; every 10 steps their loss
    decides whether the model improved, and training stops early after ``patience`` steps
    without improvement.

    With a frozen encoder, the first training also chooses what the hypercolumn holds: a
    head on the grey value alone, then on the grey value and its smoothed copies, then on
    those and the first 1, 2, ... encoder levels, each trained the same way; the one with
    the lowest held-out loss is kept (ties go to the simpler). Smoothed grey values help
    on noisy images and hurt thin structures; deep, coarse levels help where texture and
    context tell classes apart, and overfit a handful of strokes where grey values already do.

    The segmenter holds the best model seen so far at every yield: closing the generator
    (cancel) keeps it. Calling again continues from it (warm start, same depth) and reuses
    the encoder's features of the same volume.

    Args:
        segmenter: the model to train (in place).
        volume: (Z, Y, X) image.
        labels: (Z, Y, X) integers, 0 = not annotated, 1..N classes (at least two present).
        spacing, resample: voxel size and resampling (:func:`napari_crossd.engine.features_job`).
        steps: most training steps (per candidate hypercolumn when choosing it).
        full: train the encoder as well, on crops around strokes (slower; all levels;
            BatchNorm statistics stay frozen).
        select_depth: choose the hypercolumn on the first training (frozen encoder); without
            it, the head uses every level and the smoothed grey values.
        lr: AdamW learning rate (default 1e-2 for the head; the encoder gets a hundredth of it).
        batch_points: annotated voxels per step (frozen encoder).
        patience: steps without held-out improvement before stopping.
        max_points: most annotated voxels used (class-balanced subsample beyond).
        crop: crop edge for ``full`` training, encoded voxels.
        tile, overlap: sliding-window settings of the frozen encoder's pass.
        device: where to train.
        seed: seeds the head's initialisation, sampling, splits and augmentation (dropout
            draws from torch's global generator: ``torch.manual_seed`` for bit-exact runs).

    Yields:
        :class:`Progress` per step with its training ``loss``.

    Returns:
        ``{"steps", "best_step", "best_loss", "depth", "smooth", "stopped_early", "classes",
        "validation"}``: ``depth`` levels and ``smooth`` (smoothed grey values) in the chosen hypercolumn.
    """
    check_volume(volume)
    labels = _check_labels(labels, volume.shape, segmenter.num_classes)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}.")
    device = resolve_device(device)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    coords, classes = _annotated_points(labels, max_points, rng)
    held = _held_out(coords, classes, rng)
    coords, classes, held = torch.from_numpy(coords), torch.from_numpy(classes), torch.from_numpy(held)
    train = (coords[~held], classes[~held])
    validation = (coords[held], classes[held]) if held.any() else train
    fresh = segmenter.trained_steps == 0
    deepest = len(segmenter.levels)
    # Hypercolumn candidates (depth, smooth), simplest first.
    if full:
        candidates = [(deepest, segmenter.smooth)]
    elif fresh and select_depth and segmenter.smoothing:
        candidates = [(0, False)] + [(depth, True) for depth in range(deepest + 1)]
    elif fresh and select_depth:
        candidates = [(depth, False) for depth in range(deepest + 1)]
    else:
        candidates = [(segmenter.depth, segmenter.smooth)]

    pyramid = yield from segmenter.pyramid_job(
        volume,
        levels=segmenter.levels[: max(depth for depth, _ in candidates)],
        smoothed=any(smooth for _, smooth in candidates),
        spacing=spacing,
        resample=resample,
        tile=tile,
        overlap=overlap,
        device=device,
    )
    total = steps * len(candidates)
    best = {"loss": math.inf, "step": 0, "rank": 0}
    done = 0
    stopped_early = False
    try:
        for rank, (depth, smooth) in enumerate(candidates):
            columns_of = functools.partial(pyramid.sample, intensity=True, depth=depth, smoothed=smooth)
            name = _hypercolumn_name(depth, smooth)
            if fresh or (depth, smooth) != (segmenter.depth, segmenter.smooth):
                with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's RNG
                    torch.manual_seed(seed)
                    head = segmenter.new_head(depth, smooth)
                head.fit_statistics(columns_of(train[0]))
            else:
                head = copy.deepcopy(segmenter.head)
            head.to(device)
            encoder = None
            parameters = [{"params": head.parameters(), "lr": lr or 1e-2}]
            if full:
                encoder = copy.deepcopy(segmenter.encoder).to(device)
                encoder.requires_grad_(True)
                parameters.append({"params": encoder.parameters(), "lr": (lr or 1e-2) / 100})
            optimizer = torch.optim.AdamW(parameters, weight_decay=1e-4)
            val_columns = None if full else columns_of(validation[0]).to(device)
            candidate_best, since_best = math.inf, 0
            for step in range(1, steps + 1):
                head.train()
                if full:
                    loss = _full_step(encoder, head, segmenter, pyramid, *train, crop, generator, device)
                else:
                    batch = _class_batches(train[1], batch_points, generator)
                    jitter = (torch.rand(batch.numel(), 3, generator=generator) - 0.5) * 2 * _JITTER
                    columns = columns_of(train[0][batch] + jitter).to(device)
                    loss = F.cross_entropy(head(columns), train[1][batch].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                done += 1
                segmenter.trained_steps += 1

                if step == 1 or step % _EVAL_EVERY == 0 or step == steps:
                    head.eval()
                    with torch.no_grad():
                        if full:
                            val_loss = _full_loss(encoder, head, segmenter, pyramid, *validation, crop, device)
                        else:
                            val_loss = F.cross_entropy(head(val_columns), validation[1].to(device)).item()
                    if val_loss < candidate_best:
                        candidate_best, since_best = val_loss, 0
                    else:
                        since_best += _EVAL_EVERY
                    # A richer candidate must beat a simpler best by 2 %: ties go to the simpler.
                    margin = 0.98 if rank > best["rank"] else 1.0
                    if val_loss < best["loss"] * margin:
                        best = {"loss": val_loss, "step": done, "rank": rank, "name": name}
                        segmenter.use_head(copy.deepcopy(head).cpu().eval(), depth, smooth)
                        if full:
                            # A new module, not a write into the old one: the network the
                            # segmenter was built on may be the caller's (a widget's model).
                            segmenter.encoder = copy.deepcopy(encoder).cpu().eval().requires_grad_(False)
                            segmenter._encoder_revision += 1
                yield Progress(
                    done,
                    total,
                    f"{name}, step {step}/{steps}: loss {loss.item():.4f}; best held-out loss "
                    f"{best['loss']:.4f} ({best.get('name', name)})",
                    loss=loss.item(),
                )
                if since_best >= patience:
                    stopped_early = True
                    break
    finally:
        release_memory(device)
    return {
        "steps": done,
        "best_step": best["step"],
        "best_loss": best["loss"],
        "depth": segmenter.depth,
        "smooth": segmenter.smooth,
        "stopped_early": stopped_early,
        "classes": [int(c) + 1 for c in classes.unique()],
        "validation": int(held.sum()),
    }


def _crop_pyramid(encoder, segmenter, pyramid, centre, crop, generator, device, augment) -> tuple[Pyramid, tuple]:
    """Encode a ``crop``^3 window of the encoded grid around ``centre`` (source coordinates)."""
    deepest = max(pyramid.strides)
    size = [min(math.ceil(crop / deepest) * deepest, n) for n in pyramid.padded_shape]
    encoded = [(c + 0.5) * s - 0.5 for c, s in zip(centre.tolist(), pyramid.scale, strict=True)]
    origin = [
        int(min(max(0, round(e - n / 2)) // deepest * deepest, total - n))
        for e, n, total in zip(encoded, size, pyramid.padded_shape, strict=True)
    ]
    window = tuple(slice(o, o + n) for o, n in zip(origin, size, strict=True))
    region = pyramid.intensity[window]
    smoothed = pyramid.smoothed[(slice(None), *window)] if segmenter.smooth else None
    flips = []
    if augment:
        flips = [axis for axis in range(3) if torch.rand(1, generator=generator).item() < 0.5]
        gain = 0.9 + 0.2 * torch.rand(1, generator=generator).item()
        offset = 0.1 * (torch.rand(1, generator=generator).item() - 0.5)
        region = region * gain + offset
        smoothed = None if smoothed is None else smoothed * gain + offset
    x = network_input(region, pyramid.stats, encoder.crossd_meta.get("normalization"), input_channels(encoder))
    if flips:
        x = x.flip([axis + 1 for axis in flips])
    with autocast(device):
        levels = forward_levels(encoder, x[None].to(device), segmenter.levels)
    levels = [level[0].float().flip([axis + 1 for axis in flips]) if flips else level[0].float() for level in levels]
    crop_pyramid = Pyramid(
        levels, pyramid.strides, region.to(device), pyramid.source_shape, pyramid.scale, tuple(origin),
        smoothed=None if smoothed is None else smoothed.to(device),
    )
    return crop_pyramid, (origin, size)


def _points_in_crop(pyramid: Pyramid, coords: torch.Tensor, origin, size) -> torch.Tensor:
    encoded = (coords.float() + 0.5) * torch.tensor(pyramid.scale) - 0.5
    low, high = (
        torch.tensor(origin, dtype=torch.float32),
        torch.tensor(origin, dtype=torch.float32) + torch.tensor(size) - 1,
    )
    return ((encoded >= low) & (encoded <= high)).all(1)


def _crop_loss(encoder, head, segmenter, pyramid, coords, classes, centre, crop, generator, device, augment):
    crop_pyramid, (origin, size) = _crop_pyramid(encoder, segmenter, pyramid, centre, crop, generator, device, augment)
    inside = _points_in_crop(pyramid, coords, origin, size)
    points, targets = coords[inside], classes[inside].to(device)
    counts = torch.bincount(targets, minlength=segmenter.num_classes).float()
    weight = torch.where(counts > 0, 1 / counts.clamp_min(1), torch.zeros_like(counts))
    columns = crop_pyramid.sample(points, intensity=True, smoothed=segmenter.smooth)
    return F.cross_entropy(head(columns), targets, weight=weight)


def _full_step(encoder, head, segmenter, pyramid, coords, classes, crop, generator, device):
    encoder.eval()  # BatchNorm statistics stay those of the pretraining; its weights still learn
    present = classes.unique()
    chosen = present[torch.randint(present.numel(), (1,), generator=generator)]
    candidates = torch.nonzero(classes == chosen).flatten()
    centre = coords[candidates[torch.randint(candidates.numel(), (1,), generator=generator)]][0]
    return _crop_loss(encoder, head, segmenter, pyramid, coords, classes, centre, crop, generator, device, True)


def _full_loss(encoder, head, segmenter, pyramid, coords, classes, crop, device, crops: int = 4) -> float:
    generator = torch.Generator().manual_seed(0)
    centres = coords[torch.randperm(coords.shape[0], generator=generator)[:crops]]
    losses = [
        _crop_loss(encoder, head, segmenter, pyramid, coords, classes, centre, crop, generator, device, False).item()
        for centre in centres
    ]
    return float(np.mean(losses))


def finetune(
    segmenter: Segmenter, volume, labels, *, progress: Callable[[Progress], None] | None = None, **kwargs
) -> dict:
    """:func:`finetune_job` run to the end; ``progress`` receives each :class:`Progress`."""
    return run_job(finetune_job(segmenter, volume, labels, **kwargs), progress)


def _predict(segmenter: Segmenter, pyramid: Pyramid, device: torch.device) -> Job[tuple[np.ndarray, np.ndarray]]:
    head = copy.deepcopy(segmenter.head).to(device).eval()
    shape = pyramid.source_shape
    probabilities = np.empty((segmenter.num_classes, *shape), dtype=np.float16)

    def classify(block: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return head.forward_grid(block.to(device)).softmax(0).cpu()

    for index, count, z, block in hypercolumn_slabs(
        pyramid, 1, intensity=True, depth=segmenter.depth, transform=classify, smoothed=segmenter.smooth
    ):
        probabilities[:, z] = block.numpy()
        yield Progress(index + 1, count, f"classifying slab {index + 1}/{count}")
    return _labels_from(probabilities), probabilities


def _labels_from(probabilities):
    """Labels 1..N (the most probable class) of ``(N, Z, Y, X)`` probabilities, numpy or dask."""
    dtype = np.uint8 if probabilities.shape[0] < 255 else np.uint16
    return (probabilities.argmax(0) + 1).astype(dtype)


def segment_job(
    segmenter: Segmenter,
    volume,
    *,
    spacing: Sequence[float] | None = None,
    resample: bool | None = None,
    tile: int | None = None,
    overlap: float = 0.25,
    batch: int = 1,
    device: str | torch.device = "auto",
) -> Job[tuple[np.ndarray, np.ndarray]]:
    """Classify every voxel of ``volume``.

    Args:
        segmenter: a trained :class:`Segmenter`.
        volume: (Z, Y, X) numpy, memory-mapped or dask array.
        spacing, resample, tile, overlap, batch, device: as :func:`napari_crossd.engine.features_job`.

    Returns:
        ``(labels, probabilities)``: labels (Z, Y, X) uint8 with values 1..N (uint16 for
        255 classes or more) and probabilities (N, Z, Y, X) float16. For a dask
        ``volume``, both are lazy dask arrays computed block by block.
    """
    check_volume(volume)
    if segmenter.trained_steps == 0:
        raise ValueError("The segmenter is untrained: fine-tune it on painted labels first.")
    device = resolve_device(device)
    settings = dict(spacing=spacing, resample=resample, tile=tile, overlap=overlap, batch=batch, device=device)
    if isinstance(volume, da.Array):
        stats = intensity_stats(volume, segmenter.preset)
        scale = spacing_scale(spacing, resample)

        def block_probabilities(block: np.ndarray) -> np.ndarray:
            def job():
                pyramid = yield from encode_job(
                    segmenter.encoder,
                    block,
                    stats,
                    levels=segmenter.levels[: segmenter.depth],
                    scale=scale,
                    tile=tile,
                    overlap=overlap,
                    batch=batch,
                    device=device,
                )
                if segmenter.smooth:
                    pyramid = pyramid.with_smoothing(segmenter.smoothing)
                return (yield from _predict(segmenter, pyramid, device))

            return run_job(job())[1]

        probabilities = lazy_blocks(volume, segmenter.num_classes, block_probabilities, dtype=np.float16)
        return _labels_from(probabilities), probabilities
    pyramid = yield from segmenter.pyramid_job(
        volume, levels=segmenter.levels[: segmenter.depth], smoothed=segmenter.smooth, **settings
    )
    return (yield from _predict(segmenter, pyramid, device))


def segment(segmenter: Segmenter, volume, *, progress: Callable[[Progress], None] | None = None, **kwargs):
    """:func:`segment_job` run to the end; ``progress`` receives each :class:`Progress`."""
    return run_job(segment_job(segmenter, volume, **kwargs), progress)


def save_segmenter(segmenter: Segmenter, directory: str | Path) -> list[Path]:
    """Write ``segmenter`` to ``directory``: encoder and head as safetensors, settings as JSON.

    The files are written into a temporary directory beside ``directory`` and moved into
    place at the end, so a failed save leaves an earlier model in ``directory`` whole.

    Returns:
        The paths written.
    """
    from ..io import save_model

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a directory: a segmenter is saved as a directory.")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".partial", dir=directory.parent))
    try:
        save_model(segmenter.encoder, staging / ENCODER_FILE)
        head_state = {k: v.detach().cpu().contiguous() for k, v in segmenter.head.state_dict().items()}
        (staging / HEAD_FILE).write_bytes(safetensors.torch.save(head_state))
        (staging / SEGMENTER_FILE).write_text(json.dumps(segmenter.config(), indent=2) + "\n")
        os.chmod(staging, 0o755)
        if directory.exists():
            previous = directory.with_name(f".{directory.name}.previous")
            shutil.rmtree(previous, ignore_errors=True)
            directory.replace(previous)
            staging.replace(directory)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            staging.replace(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sorted(directory.iterdir())


def load_segmenter(directory: str | Path) -> Segmenter:
    """Rebuild a :class:`Segmenter` that :func:`save_segmenter` wrote."""
    from ..io import load_model

    directory = Path(directory)
    config_path = directory / SEGMENTER_FILE
    if not directory.is_dir():
        raise FileNotFoundError(f"No saved segmenter at {directory}: expected a directory with {SEGMENTER_FILE}.")
    if not config_path.is_file():
        raise ValueError(f"{directory} is not a saved segmenter: it has no {SEGMENTER_FILE}.")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from None
    if config.get("format") != "napari-crossd segmenter":
        raise ValueError(f"{config_path} does not describe a napari-crossd segmenter.")
    encoder = load_model(directory / ENCODER_FILE)
    segmenter = Segmenter(
        encoder, config["class_names"], levels=config["levels"], preset=config["preset"], hidden=config["hidden"],
        smoothing=config.get("smoothing", ()),  # saved before smoothing existed: the raw grey value alone
    )
    depth = int(config.get("depth", len(segmenter.levels)))
    smooth = bool(config.get("smooth", False))
    head = segmenter.new_head(depth, smooth)
    head.load_state_dict(safetensors.torch.load_file(directory / HEAD_FILE))
    segmenter.use_head(head.eval(), depth, smooth)
    segmenter.trained_steps = int(config.get("trained_steps", 0))
    return segmenter
