"""Segmentation from painted strokes: a random forest on each voxel's filter bank and deep features.

Convention:
    Label volumes follow :class:`.annotations.Annotations` (0 = not annotated, 1..N
    classes). Predictions give every voxel a class 1..N and, on request, per-class
    probabilities (N, Z, Y, X) float16. A voxel's features are those of
    :mod:`.voxel_features`: grey value, a 3D filter bank at full resolution and the
    encoder's levels down to stride 16.

Training touches only the painted voxels: their features are computed once and kept by
the caller's :class:`~.voxel_features.VolumeFeatures`, and the forest is refit on all
strokes in a second or two, so a round of corrective strokes retrains at once. ``full=True``
first fine-tunes the encoder on crops around the strokes (:mod:`.encoder_tuning`).
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Callable, Sequence
from pathlib import Path

import dask.array as da
import numpy as np
import safetensors.numpy
import torch
from sklearn.metrics import f1_score
from sklearn.model_selection import GroupKFold
from torch import nn

from ..io import load_model, save_model
from ..io.atomic import atomic_directory
from .annotations import Annotations, annotations_of_volumes
from .classifier import ForestClassifier
from .context import ContextSpec, class_maps_job, context_of_box, context_scores, cross_fitted_context_job
from .devices import release_memory, resolve_device
from .encoder_tuning import tune_encoder_job
from .features import check_levels, lazy_blocks, require_3d
from .jobs import Job, Progress, named_job, run_job
from .normalize import PRESETS, check_volume, intensity_stats
from .pyramid import default_levels
from .voxel_features import FeatureSpec, VolumeFeatures

__all__ = [
    "Segmenter",
    "choose_levels",
    "default_spec",
    "finetune",
    "finetune_job",
    "finetune_pairs",
    "finetune_pairs_job",
    "load_segmenter",
    "save_segmenter",
    "segment",
    "segment_job",
]

SEGMENTER_FILE = "segmenter.json"
FOREST_FILE = "forest.safetensors"
CONTEXT_FILE = "context_forest.safetensors"
ENCODER_FILE = "encoder.safetensors"
FORMAT_VERSION = 2
# Deep levels down to stride 16: on the strokes suite the coarse levels carry the context
# (where a structure lies) that grey values and filters cannot (benchmarks/strokes/).
DEEPEST_STRIDE = 16
# Auto-context on by default: on the strokes suite it gains where a class is a part of an object
# (nucleus boundary vs interior) and the cross-validation turns it off where it does not pay.
DEFAULT_CONTEXT = ContextSpec()


def default_spec(encoder: nn.Module) -> FeatureSpec:
    """Grey value, the filter bank at sigma 1, 2, 4 and the encoder's levels to stride 16."""
    return FeatureSpec(tuple(default_levels(encoder, DEEPEST_STRIDE)))


class Segmenter:
    """An inflated encoder, the features it gives each voxel, and a classifier on them.

    Args:
        encoder: 3D network (:func:`napari_crossd.engine.prepare_model`).
        classes: number of classes N (>= 2), or their names in label order (label 1 first).
        spec: the voxel features (default :func:`default_spec`); ``levels=`` is a shortcut
            for the default spec with other encoder levels.
        preset: intensity normalisation (:data:`napari_crossd.engine.normalize.PRESETS`).
        classifier: the classifier (default: a :class:`~.classifier.ForestClassifier`).
        context: auto-context (:mod:`.context`): a second forest of the same settings that also
            reads the first one's smoothed class maps, kept where it wins the cross-validation
            over painted planes (:func:`finetune_pairs_job`); None: the first forest alone.
    """

    def __init__(
        self,
        encoder: nn.Module,
        classes: int | Sequence[str],
        *,
        spec: FeatureSpec | None = None,
        levels: Sequence[int] | None = None,
        preset: str = "auto",
        classifier: ForestClassifier | None = None,
        context: ContextSpec | None = DEFAULT_CONTEXT,
    ) -> None:
        require_3d(encoder)
        if preset not in PRESETS:
            raise ValueError(f"Unknown normalisation preset {preset!r}; expected one of {', '.join(PRESETS)}.")
        names = [f"class {i}" for i in range(1, classes + 1)] if isinstance(classes, int) else [str(c) for c in classes]
        if len(names) < 2:
            raise ValueError(f"A segmenter needs at least 2 classes, got {len(names)}.")
        if spec is not None and levels is not None:
            raise ValueError("Give either spec= or levels=, not both.")
        self.encoder = encoder.eval()
        self.class_names = names
        self.preset = preset
        if levels is not None:
            spec = FeatureSpec(tuple(check_levels(encoder, levels)))
        self.spec = spec or default_spec(encoder)
        check_levels(encoder, self.spec.levels or [0])
        self.classifier = classifier or ForestClassifier(len(names))
        self.context = context
        # Stage 2 (trained only when the strokes lie in two groups or more: see cross_fitted_context_job).
        self.context_classifier: ForestClassifier | None = None
        self.trained_voxels = 0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def trained(self) -> bool:
        return self.classifier.fitted

    @property
    def two_stage(self) -> bool:
        """Whether predictions come from the auto-context forest."""
        return self.context is not None and self.context_classifier is not None

    @property
    def halo(self) -> int:
        """Voxels of context a block needs around it (features, and the class maps of auto-context)."""
        return max(self.spec.halo(self.encoder), self.context.halo if self.context else 0)

    def describe(self) -> str:
        """What each voxel's feature vector holds, e.g. for a status line."""
        strides = [self.encoder.feature_info[level]["reduction"] for level in self.spec.levels]
        sigmas = ", ".join(f"{s:g}" for s in self.spec.sigmas)
        filters = f"filters at sigma {sigmas}" if sigmas else "no filters"
        deep = f"encoder strides {', '.join(map(str, strides))}" if strides else "no encoder levels"
        stages = f", auto-context at sigma {', '.join(f'{s:g}' for s in self.context.sigmas)}" if self.two_stage else ""
        return f"{self.spec.channels(self.encoder)} features (grey value, {filters}, {deep}){stages}"

    def features(self, volume, *, cached: VolumeFeatures | None = None, spacing=None, resample=None, **kwargs):
        """A :class:`~.voxel_features.VolumeFeatures` of ``volume`` for this segmenter, to pass
        to :func:`finetune` and :func:`segment` so that both reuse what is computed.

        ``cached`` is returned itself when it serves this volume, encoder and spec
        (:meth:`~.voxel_features.VolumeFeatures.serves`); other keywords are
        :class:`~.voxel_features.VolumeFeatures`'s (tile, overlap, batch, stats, ...).
        """
        if cached is not None and cached.serves(volume, self.encoder, self.spec, spacing, resample):
            return cached
        return VolumeFeatures(
            volume, self.encoder, self.spec, preset=self.preset, spacing=spacing, resample=resample, **kwargs
        )

    def config(self) -> dict:
        """What :func:`load_segmenter` needs besides the weights (JSON-serialisable)."""
        return {
            "format": "napari-crossd segmenter",
            "version": FORMAT_VERSION,
            "class_names": self.class_names,
            "features": self.spec.to_dict(),
            "preset": self.preset,
            "classifier": self.classifier.config(),
            "context": None if self.context is None else self.context.to_dict(),
            "trained_voxels": self.trained_voxels,
            "encoder": self.encoder.crossd_meta.to_dict(),
        }


def finetune_job(
    segmenter: Segmenter, volume, labels, *, features: VolumeFeatures | None = None, **kwargs
) -> Job[dict]:
    """Train ``segmenter`` on the annotated voxels of one volume: :func:`finetune_pairs_job`
    with the single pair ``(volume, labels)`` and its ``features`` cache."""
    return finetune_pairs_job(segmenter, [(volume, labels)], features=[features], **kwargs)


def finetune_pairs_job(
    segmenter: Segmenter,
    pairs: Sequence[tuple],
    *,
    features: Sequence[VolumeFeatures | None] | None = None,
    names: Sequence[str] | None = None,
    spacing: Sequence | None = None,
    resample: bool | None = None,
    tile: int | None = None,
    overlap: float = 0.25,
    batch: int = 1,
    max_points: int = 200_000,
    full: bool = False,
    steps: int = 150,
    crop: int = 64,
    select: bool = True,
    device: str | torch.device = "auto",
    seed: int = 0,
) -> Job[dict]:
    """Train ``segmenter`` on the annotated voxels of one or more volumes.

    The forest is refit on all annotated voxels each time (a second round of strokes adds
    to the first: pass the whole strokes volumes again); their features come from
    ``features`` where it serves the volume and encoder, so painted voxels are computed
    once. Every label volume is checked before any feature is computed. Cancelling
    (closing the generator) before the fit leaves the segmenter as it was.

    Args:
        segmenter: the model to train (in place).
        pairs: ``(volume, labels)`` pairs: a (Z, Y, X) image (numpy or memory-mapped) and
            its labels of the same shape (0 = not annotated, 1..N classes; or their
            :class:`~.annotations.Annotations`). Two classes must be painted over all
            pairs together; each volume needs at least one.
        features: per pair, the caller's cache of that volume's features
            (:meth:`Segmenter.features`) or None.
        names: per pair, a name for progress messages (default ``"volume i/n"``).
        spacing: the voxel size of every volume (Z, Y, X), or one per pair.
        resample, tile, overlap, batch: as :func:`napari_crossd.engine.features_job`.
        max_points: most annotated voxels used over all pairs (class-balanced subsample beyond).
        full: first fine-tune the encoder on crops around the strokes
            (:func:`.encoder_tuning.tune_encoder_job`, ``steps`` and ``crop``; one pair
            only): a new encoder, so every feature is computed again.
        select: on the first training, choose how many encoder levels the features keep
            (:func:`choose_levels`) and whether auto-context is used (the segmenter's
            ``context``: kept if it raises the held-out macro F1 by 0.02, as a level must);
            later trainings keep both choices.
        device: where the encoder runs.
        seed: seeds the subsample, the forest and the encoder fine-tuning.

    Yields:
        :class:`Progress` with a ``phase``: ``"encoder"`` (with ``loss``), ``"features"``, ``"fit"``.

    Returns:
        ``{"voxels", "per_volume", "classes", "channels", "blocks", "encoder", "levels", "context"}``:
        voxels trained on (in all and per pair), the classes painted, the feature length,
        the volumes' blocks, the encoder fine-tuning's summary (``full``) or None, the level
        choice (:func:`choose_levels`) or None, and auto-context: ``{"used", "scores"}``
        (macro F1 on held-out painted planes without and with it, when chosen on this training).
    """
    names = list(names) if names is not None else [f"volume {i + 1}/{len(pairs)}" for i in range(len(pairs))]
    annotations = _annotations_of(pairs, names, segmenter.num_classes, max_points, seed)
    caches = list(features) if features is not None else [None] * len(pairs)
    spacings = _per_pair(spacing, len(pairs))
    if not len(caches) == len(spacings) == len(names) == len(pairs):
        raise ValueError(f"{len(pairs)} pairs but {len(caches)} feature caches, {len(spacings)} spacings "
                         f"and {len(names)} names: give one of each per pair.")
    if full and len(pairs) > 1:
        raise ValueError(f"Encoder fine-tuning (full=True) works on one volume; {len(pairs)} pairs were given.")
    device = resolve_device(device)
    settings = dict(resample=resample, tile=tile, overlap=overlap, batch=batch)
    tuning, previous = None, segmenter.encoder
    if full:  # a new module: the caller's network stays as it was
        segmenter.encoder, tuning = yield from tune_encoder_job(
            segmenter.encoder, pairs[0][0], annotations[0], segmenter.preset, steps=steps, crop=crop, device=device,
            seed=seed, spacing=spacings[0], **settings,
        )
    columns, sources = [], []
    try:
        for index, (pair, cache, spacing) in enumerate(zip(pairs, caches, spacings, strict=True)):
            source = segmenter.features(pair[0], cached=cache, spacing=spacing, **settings)
            columns.append((yield from named_job(source.columns_job(annotations[index].coords, device), names[index])))
            sources.append(source)
            if index < len(pairs) - 1:
                source.block = None  # one volume's block in memory at a time; the last stays for predicting
        summary = yield from _fit_job(segmenter, np.concatenate(columns), annotations, sources, select, device, seed)
    except BaseException:  # cancelled or failed: the segmenter stays as it was
        segmenter.encoder = previous
        raise
    finally:
        release_memory(device)
    return {**summary, "blocks": sum(len(source.boxes) for source in sources), "encoder": tuning}


def _per_pair(spacing, count: int) -> list:
    """``spacing`` for each of ``count`` pairs: one voxel size for all, or a list of them."""
    if spacing is None or all(isinstance(s, numbers.Real) for s in spacing):
        return [spacing] * count
    return list(spacing)


def _annotations_of(pairs, names, num_classes: int, max_points: int, seed: int) -> list[Annotations]:
    """Every pair's :class:`Annotations` (checked by the one label rule), together at most
    ``max_points`` voxels."""
    for volume, *_ in pairs:
        check_volume(volume)
    annotations = annotations_of_volumes((labels for _, labels, *_ in pairs), [v.shape for v, *_ in pairs], names,
                                         num_classes)
    total = sum(len(a) for a in annotations)
    return [a.subsample(max(1, max_points * len(a) // total), seed) for a in annotations]


def _fit_job(segmenter: Segmenter, columns: np.ndarray, annotations: list[Annotations],
             sources: list[VolumeFeatures], select: bool, device: torch.device, seed: int):
    """Fit the forests on the painted voxels' ``columns`` of every volume (in order); the
    segmenter changes only at the end, so a cancelled fit leaves it as it was."""
    classes = np.concatenate([a.classes for a in annotations])
    volumes = np.concatenate([np.full(len(a), i) for i, a in enumerate(annotations)])
    # Held-out groups of one volume never mix with another's.
    groups = np.unique(np.stack([volumes, np.concatenate([a.groups() for a in annotations])], 1), axis=0,
                       return_inverse=True)[1].ravel()
    spec, choice = segmenter.spec, None
    if select and not segmenter.trained:
        yield Progress(0, 1, "choosing the encoder levels by cross-validation over painted planes", phase="fit")
        spec, choice = choose_levels(columns, classes, groups, spec, segmenter.encoder, seed)
    columns = columns[:, : spec.channels(segmenter.encoder)]
    yield Progress(0, 1, f"fitting the forest on {len(classes):,} painted voxels", phase="fit")
    forest = segmenter.classifier.unfitted(seed).fit(columns, classes)
    second, gate = None, None
    # Later trainings keep the first one's choice, as they keep its levels.
    wanted = segmenter.context is not None and (segmenter.two_stage or not segmenter.trained or not select)
    if wanted:
        context = yield from named_job(cross_fitted_context_job(
            forest, columns, classes, groups, volumes, np.concatenate([a.coords for a in annotations]), sources,
            spec, segmenter.context, device, seed), "auto-context")
        if context is not None and select and not segmenter.trained:
            scores = context_scores(forest, columns, context, classes, groups, _CV_TREES, seed)
            gate = {"used": scores[1] > scores[0] + _CV_MARGIN, "scores": list(scores)}
            context = context if gate["used"] else None
        if context is not None:
            yield Progress(0, 1, "fitting the auto-context forest", phase="fit")
            second = forest.unfitted(seed).fit(np.concatenate([columns, context], 1), classes)
    segmenter.spec, segmenter.classifier, segmenter.context_classifier = spec, forest, second
    segmenter.trained_voxels = len(classes)
    yield Progress(1, 1, f"trained on {len(classes):,} voxels, {columns.shape[1]} features", phase="fit")
    return {
        "voxels": len(classes),
        "per_volume": [len(a) for a in annotations],
        "classes": [int(c) for c in np.unique(classes)],
        "channels": int(columns.shape[1]),
        "levels": choice,
        "context": {"used": second is not None, "scores": gate["scores"] if gate else None},
    }


# Cross-validation forests are smaller than the final one: the choice needs a ranking, not the last 0.01.
_CV_TREES = 16
# The level choice was measured on the strokes suite with these forests (sqrt(channels) per
# split, classes weighed by their strokes).
_CV_MAX_FEATURES = "sqrt"
_CV_CLASS_WEIGHT = "balanced_subsample"
_CV_FOLDS = 4
# A candidate with more encoder levels must beat the best simpler one by this much (macro F1):
# on the strokes suite, changing only the forests' seed moved candidates' scores by about 0.01
# and flipped choices at 0.005, and a needless deep level misleads the forest far from the
# painted slices (benchmarks/strokes/results/README.md).
_CV_MARGIN = 0.02


def choose_levels(
    columns: np.ndarray, classes: np.ndarray, groups: np.ndarray, spec: FeatureSpec, encoder: nn.Module, seed: int = 0
) -> tuple[FeatureSpec, dict | None]:
    """How many encoder levels to keep, chosen by cross-validation over painted planes.

    Deep levels tell classes apart by where they are; where grey values and filters already
    do, their hundreds of channels only dilute a forest trained on a few strokes. Each
    candidate (the filter bank with the first 0, 1, ... levels of ``spec``) trains a small
    forest on all painted planes but one group of them and is scored by macro F1 on the
    held-out planes (grouped K-fold: neighbouring voxels of one stroke are near copies);
    a candidate with more levels must beat the best simpler one by 0.02.

    Args:
        columns: ``(P, C)`` features of the painted voxels.
        classes: ``(P,)`` their classes 1..N.
        groups: ``(P,)`` their held-out groups (:meth:`.annotations.Annotations.groups`).

    Returns:
        ``(spec, {"levels": chosen count, "scores": [F1 per candidate]})``; ``spec`` itself
        and None when the strokes lie on fewer than two planes (nothing to hold out).
    """
    if len(np.unique(groups)) < 2:
        return spec, None
    num_classes = int(classes.max())
    folds = list(GroupKFold(min(_CV_FOLDS, len(np.unique(groups)))).split(columns, classes, groups))
    scores = []
    for depth in range(len(spec.levels) + 1):
        width = FeatureSpec(spec.levels[:depth], spec.sigmas, spec.sets).channels(encoder)
        fold_scores = []
        for train, held in folds:
            forest = ForestClassifier(num_classes, trees=_CV_TREES, max_features=_CV_MAX_FEATURES,
                                      class_weight=_CV_CLASS_WEIGHT, seed=seed)
            forest.fit(columns[train, :width], classes[train])
            predicted = forest.predict_proba(columns[held, :width]).argmax(1) + 1
            fold_scores.append(f1_score(classes[held], predicted, average="macro"))
        scores.append(float(np.mean(fold_scores)))
    best = 0
    for depth, score in enumerate(scores):
        if score > scores[best] + _CV_MARGIN:
            best = depth
    return FeatureSpec(spec.levels[:best], spec.sigmas, spec.sets), {"levels": best, "scores": scores}


def finetune(
    segmenter: Segmenter, volume, labels, *, progress: Callable[[Progress], None] | None = None, **kwargs
) -> dict:
    """:func:`finetune_job` run to the end; ``progress`` receives each :class:`Progress`."""
    return run_job(finetune_job(segmenter, volume, labels, **kwargs), progress)


def finetune_pairs(
    segmenter: Segmenter, pairs: Sequence[tuple], *, progress: Callable[[Progress], None] | None = None, **kwargs
) -> dict:
    """:func:`finetune_pairs_job` run to the end; ``progress`` receives each :class:`Progress`."""
    return run_job(finetune_pairs_job(segmenter, pairs, **kwargs), progress)


def labels_dtype(num_classes: int):
    return np.uint8 if num_classes < 255 else np.uint16


def _classify(classifier: ForestClassifier, features: torch.Tensor) -> np.ndarray:
    """Probabilities ``(N, z, y, x)`` of features ``(C, z, y, x)``."""
    # Voxels as C-ordered rows: a tree reads one voxel's channels at a time.
    rows = np.ascontiguousarray(features.flatten(1).T.numpy())
    return classifier.predict_proba(rows).T.reshape(-1, *features.shape[1:])


def classify_job(segmenter: Segmenter, source: VolumeFeatures, device, out, probabilities: bool):
    """Labels (into ``out``, or a new array) and, if asked, probabilities of the voxels in
    ``source``'s blocks, chunk by chunk (:meth:`~.voxel_features.VolumeFeatures.chunks_job`).
    With auto-context, each block's stage-1 class maps come first (:mod:`.context`)."""
    shape = source.shape
    labels = np.empty(shape, dtype=labels_dtype(segmenter.num_classes)) if out is None else out
    if tuple(labels.shape) != shape:
        raise ValueError(f"out has shape {tuple(labels.shape)}; expected the volume's {shape}.")
    probs = np.empty((segmenter.num_classes, *shape), dtype=np.float16) if probabilities else None
    try:
        for index in source.order():
            maps = None
            if segmenter.two_stage:  # the maps' reach around the block, within the features' halo
                reach = min(segmenter.context.halo, source.halo)
                region = tuple(slice(max(0, b.start - reach), min(n, b.stop + reach))
                               for b, n in zip(source.boxes[index], shape, strict=True))
                maps = yield from class_maps_job(segmenter.classifier, source, segmenter.spec, segmenter.context,
                                                 device, region, block=index)
            # ``source`` may hold more encoder levels than the segmenter chose: only its own are assembled.
            for report, payload in source.chunks_job(device, segmenter.spec, block=index):
                yield report
                if payload is not None:
                    _classify_chunk(segmenter, *payload, maps, labels, probs)
                del payload  # the chunk must not stay alive while the generator computes the next block
    finally:
        release_memory(device)
    return labels, probs


def _classify_chunk(segmenter: Segmenter, box, features: torch.Tensor, maps, labels, probs) -> None:
    """Write the labels (and probabilities) of one chunk; ``maps``: stage 1's ``(maps, origin)`` or None."""
    classifier = segmenter.classifier
    if maps is not None:
        classifier = segmenter.context_classifier
        features = torch.cat([features, torch.from_numpy(context_of_box(*maps, box, segmenter.context))])
    p = _classify(classifier, features)
    labels[box] = p.argmax(0) + 1
    if probs is not None:
        probs[(slice(None), *box)] = p


def segment_job(
    segmenter: Segmenter,
    volume,
    *,
    features: VolumeFeatures | None = None,
    spacing: Sequence[float] | None = None,
    resample: bool | None = None,
    tile: int | None = None,
    overlap: float = 0.25,
    batch: int = 1,
    device: str | torch.device = "auto",
    probabilities: bool = True,
    out=None,
) -> Job[tuple[np.ndarray, np.ndarray | None]]:
    """Classify every voxel of ``volume``, block by block.

    Args:
        segmenter: a trained :class:`Segmenter`.
        volume: (Z, Y, X) numpy, memory-mapped or dask array.
        features: the caller's cache of this volume's features (:meth:`Segmenter.features`).
        spacing, resample, tile, overlap, batch, device: as :func:`napari_crossd.engine.features_job`.
        probabilities: also return per-class probabilities (N, Z, Y, X) float16.
        out: an array (e.g. a ``numpy.memmap``) of the volume's shape to write the labels
            into, so that a volume bigger than memory is labelled without holding the result.

    Returns:
        ``(labels, probabilities)``: labels (Z, Y, X) uint8 with values 1..N (uint16 for
        255 classes or more; ``out`` when given) and probabilities (N, Z, Y, X) float16, or
        None. For a dask ``volume``, both are lazy dask arrays computed block by block.
    """
    check_volume(volume)
    if not segmenter.trained:
        raise ValueError("The segmenter is untrained: fine-tune it on painted labels first.")
    device = resolve_device(device)
    settings = dict(spacing=spacing, resample=resample, tile=tile, overlap=overlap, batch=batch)
    if isinstance(volume, da.Array):
        return _lazy_segmentation(segmenter, volume, settings, device)
    source = segmenter.features(volume, cached=features, **settings)
    return (yield from classify_job(segmenter, source, device, out, probabilities))


def _lazy_segmentation(segmenter: Segmenter, volume: da.Array, settings: dict, device):
    stats = intensity_stats(volume, segmenter.preset)

    def block_probabilities(block: np.ndarray) -> np.ndarray:
        source = segmenter.features(block, stats=stats, **settings)
        return run_job(classify_job(segmenter, source, device, None, True))[1]

    probabilities = lazy_blocks(volume, segmenter.num_classes, block_probabilities, dtype=np.float16,
                                halo=segmenter.halo)
    labels = (probabilities.argmax(0) + 1).astype(labels_dtype(segmenter.num_classes))
    return labels, probabilities


def segment(segmenter: Segmenter, volume, *, progress: Callable[[Progress], None] | None = None, **kwargs):
    """:func:`segment_job` run to the end; ``progress`` receives each :class:`Progress`."""
    return run_job(segment_job(segmenter, volume, **kwargs), progress)


def save_segmenter(segmenter: Segmenter, directory: str | Path) -> list[Path]:
    """Write ``segmenter`` to ``directory``: encoder and forest as safetensors, settings as JSON.

    The directory appears whole or not at all (:func:`napari_crossd.io.atomic.atomic_directory`):
    a failed save leaves an earlier model in ``directory`` as it was.

    Returns:
        The paths written.
    """
    if not segmenter.trained:
        raise ValueError("Nothing to save: the segmenter is untrained.")
    directory = Path(directory)
    with atomic_directory(directory) as staging:
        save_model(segmenter.encoder, staging / ENCODER_FILE)
        safetensors.numpy.save_file(segmenter.classifier.state(), staging / FOREST_FILE)
        if segmenter.two_stage:
            safetensors.numpy.save_file(segmenter.context_classifier.state(), staging / CONTEXT_FILE)
        (staging / SEGMENTER_FILE).write_text(json.dumps(segmenter.config(), indent=2) + "\n")
    return sorted(directory.iterdir())


def _read_config(directory: Path) -> dict:
    config_path = directory / SEGMENTER_FILE
    if not directory.is_dir():
        raise FileNotFoundError(f"No saved segmenter at {directory}: expected a directory with {SEGMENTER_FILE}.")
    if not config_path.is_file():
        raise ValueError(f"{directory} is not a saved segmenter: it has no {SEGMENTER_FILE}.")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from None
    if not isinstance(config, dict) or config.get("format") != "napari-crossd segmenter":
        raise ValueError(f"{config_path} does not describe a napari-crossd segmenter.")
    if config.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{directory} was saved by an earlier napari-crossd (segmenter format version "
            f"{config.get('version')}: an MLP head on hypercolumns), which this version no longer runs. Its "
            f"encoder still loads: retrain with `crossd finetune IMAGE STROKES --model {directory / ENCODER_FILE} "
            "--out NEW_DIR` (or Train in the Fine-tune widget)."
        )
    return config


def load_segmenter(directory: str | Path) -> Segmenter:
    """Rebuild a :class:`Segmenter` that :func:`save_segmenter` wrote."""
    directory = Path(directory)
    config = _read_config(directory)
    encoder = load_model(directory / ENCODER_FILE)
    classes = config["class_names"]
    forest = ForestClassifier.from_state(
        len(classes), config["classifier"], safetensors.numpy.load_file(directory / FOREST_FILE)
    )
    context = ContextSpec.from_dict(config["context"]) if config.get("context") else None  # older: no context
    segmenter = Segmenter(encoder, classes, spec=FeatureSpec.from_dict(config["features"]), preset=config["preset"],
                          classifier=forest, context=context)
    if context is not None and (directory / CONTEXT_FILE).is_file():
        segmenter.context_classifier = ForestClassifier.from_state(
            len(classes), config["classifier"], safetensors.numpy.load_file(directory / CONTEXT_FILE))
    segmenter.trained_voxels = int(config.get("trained_voxels", 0))
    return segmenter
