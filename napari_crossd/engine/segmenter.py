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
from .annotations import Annotations
from .classifier import ForestClassifier
from .devices import release_memory, resolve_device
from .features import check_levels, lazy_blocks, require_3d
from .jobs import Job, Progress, run_job
from .normalize import PRESETS, check_volume, intensity_stats
from .pyramid import default_levels
from .voxel_features import FeatureSpec, VolumeFeatures

__all__ = [
    "Segmenter",
    "choose_levels",
    "default_spec",
    "finetune",
    "finetune_job",
    "load_segmenter",
    "save_segmenter",
    "segment",
    "segment_job",
]

SEGMENTER_FILE = "segmenter.json"
FOREST_FILE = "forest.safetensors"
ENCODER_FILE = "encoder.safetensors"
FORMAT_VERSION = 2
# Deep levels down to stride 16: on the strokes suite the coarse levels carry the context
# (where a structure lies) that grey values and filters cannot (benchmarks/strokes/).
DEEPEST_STRIDE = 16


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
        self.trained_voxels = 0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def trained(self) -> bool:
        return self.classifier.fitted

    def describe(self) -> str:
        """What each voxel's feature vector holds, e.g. for a status line."""
        strides = [self.encoder.feature_info[level]["reduction"] for level in self.spec.levels]
        sigmas = ", ".join(f"{s:g}" for s in self.spec.sigmas)
        filters = f"filters at sigma {sigmas}" if sigmas else "no filters"
        deep = f"encoder strides {', '.join(map(str, strides))}" if strides else "no encoder levels"
        return f"{self.spec.channels(self.encoder)} features (grey value, {filters}, {deep})"

    def features(self, volume, *, spacing=None, resample=None, tile=None, overlap=0.25, batch=1, **kwargs):
        """A :class:`~.voxel_features.VolumeFeatures` of ``volume`` for this segmenter, to pass
        to :func:`finetune` and :func:`segment` so that both reuse what is computed."""
        return VolumeFeatures(
            volume, self.encoder, self.spec, preset=self.preset, spacing=spacing, resample=resample, tile=tile,
            overlap=overlap, batch=batch, **kwargs,
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
            "trained_voxels": self.trained_voxels,
            "encoder": self.encoder.crossd_meta.to_dict(),
        }


def _features_for(segmenter: Segmenter, volume, features: VolumeFeatures | None, settings: dict) -> VolumeFeatures:
    spacing, resample = settings.get("spacing"), settings.get("resample")
    if features is not None and features.serves(volume, segmenter.encoder, segmenter.spec, spacing, resample):
        return features
    return segmenter.features(volume, **settings)


def finetune_job(
    segmenter: Segmenter,
    volume,
    labels,
    *,
    features: VolumeFeatures | None = None,
    spacing: Sequence[float] | None = None,
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
    """Train ``segmenter`` on the annotated voxels of ``labels``.

    The forest is refit on all annotated voxels each time (a second round of strokes adds
    to the first: pass the whole strokes volume again); their features come from
    ``features`` when it serves this volume and encoder, so painted voxels are computed
    once. Cancelling (closing the generator) before the fit leaves the segmenter as it was.

    Args:
        segmenter: the model to train (in place).
        volume: (Z, Y, X) image.
        labels: (Z, Y, X) integers, 0 = not annotated, 1..N classes (at least two present).
        features: the caller's cache of this volume's features (:meth:`Segmenter.features`).
        spacing, resample, tile, overlap, batch: as :func:`napari_crossd.engine.features_job`.
        max_points: most annotated voxels used (class-balanced subsample beyond).
        full: first fine-tune the encoder on crops around the strokes
            (:func:`.encoder_tuning.tune_encoder_job`, ``steps`` and ``crop``): a new
            encoder, so every feature is computed again.
        select: on the first training, choose how many encoder levels the features keep
            (:func:`choose_levels`); later trainings keep the choice.
        device: where the encoder runs.
        seed: seeds the subsample, the forest and the encoder fine-tuning.

    Yields:
        :class:`Progress` with a ``phase``: ``"encoder"`` (with ``loss``), ``"features"``, ``"fit"``.

    Returns:
        ``{"voxels", "classes", "channels", "blocks", "encoder", "levels"}``: voxels trained
        on, the classes painted, the feature length, the volume's blocks, the encoder
        fine-tuning's summary (``full``) or None, and the level choice
        (:func:`choose_levels`) or None.
    """
    check_volume(volume)
    annotations = Annotations.from_labels(labels, volume.shape, segmenter.num_classes).subsample(max_points, seed)
    device = resolve_device(device)
    settings = dict(spacing=spacing, resample=resample, tile=tile, overlap=overlap, batch=batch)
    tuning = None
    if full:
        from .encoder_tuning import tune_encoder_job

        encoder, tuning = yield from tune_encoder_job(
            segmenter.encoder, volume, annotations, segmenter.preset, steps=steps, crop=crop, device=device,
            seed=seed, **settings,
        )
    try:
        if full:
            segmenter.encoder = encoder  # a new module: the caller's network stays as it was
        source = _features_for(segmenter, volume, features, settings)
        columns = yield from source.columns_job(annotations.coords, device)
    finally:
        release_memory(device)
    choice = None
    if select and not segmenter.trained:
        yield Progress(0, 1, "choosing the encoder levels by cross-validation over painted planes", phase="fit")
        segmenter.spec, choice = choose_levels(columns, annotations, segmenter.spec, segmenter.encoder, seed)
    columns = columns[:, : segmenter.spec.channels(segmenter.encoder)]
    yield Progress(0, 1, f"fitting the forest on {len(annotations):,} painted voxels", phase="fit")
    segmenter.classifier.seed = seed
    segmenter.classifier.fit(columns, annotations.classes)
    segmenter.trained_voxels = len(annotations)
    yield Progress(1, 1, f"trained on {len(annotations):,} voxels, {columns.shape[1]} features", phase="fit")
    return {
        "voxels": len(annotations),
        "classes": annotations.painted_classes,
        "channels": int(columns.shape[1]),
        "blocks": len(source.boxes),
        "encoder": tuning,
        "levels": choice,
    }


# Cross-validation forests are smaller than the final one: the choice needs a ranking, not the last 0.01.
_CV_TREES = 16
_CV_FOLDS = 4
# A candidate with more encoder levels must beat the best simpler one by this much (macro F1).
_CV_MARGIN = 0.005


def choose_levels(
    columns: np.ndarray, annotations: Annotations, spec: FeatureSpec, encoder: nn.Module, seed: int = 0
) -> tuple[FeatureSpec, dict | None]:
    """How many encoder levels to keep, chosen by cross-validation over painted planes.

    Deep levels tell classes apart by where they are; where grey values and filters already
    do, their hundreds of channels only dilute a forest trained on a few strokes. Each
    candidate (the filter bank with the first 0, 1, ... levels of ``spec``) trains a small
    forest on all painted planes but one group of them and is scored by macro F1 on the
    held-out planes (grouped K-fold: neighbouring voxels of one stroke are near copies);
    a candidate with more levels must beat the best simpler one by 0.005.

    Returns:
        ``(spec, {"levels": chosen count, "scores": [F1 per candidate]})``; ``spec`` itself
        and None when the strokes lie on fewer than two planes (nothing to hold out).
    """

    groups = annotations.groups()
    if len(np.unique(groups)) < 2:
        return spec, None
    folds = list(GroupKFold(min(_CV_FOLDS, len(np.unique(groups)))).split(columns, annotations.classes, groups))
    scores = []
    for depth in range(len(spec.levels) + 1):
        width = FeatureSpec(spec.levels[:depth], spec.sigmas, spec.sets).channels(encoder)
        fold_scores = []
        for train, held in folds:
            forest = ForestClassifier(annotations.num_classes, trees=_CV_TREES, seed=seed)
            forest.fit(columns[train, :width], annotations.classes[train])
            predicted = forest.predict_proba(columns[held, :width]).argmax(1) + 1
            fold_scores.append(f1_score(annotations.classes[held], predicted, average="macro"))
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


def _labels_dtype(num_classes: int):
    return np.uint8 if num_classes < 255 else np.uint16


def _classify(classifier: ForestClassifier, features: torch.Tensor) -> np.ndarray:
    """Probabilities ``(N, z, y, x)`` of features ``(C, z, y, x)``."""
    # Voxels as C-ordered rows: a tree reads one voxel's channels at a time.
    rows = np.ascontiguousarray(features.flatten(1).T.numpy())
    return classifier.predict_proba(rows).T.reshape(-1, *features.shape[1:])


def _predict_job(segmenter: Segmenter, source: VolumeFeatures, device, out, probabilities: bool):
    shape = source.shape
    labels = np.empty(shape, dtype=_labels_dtype(segmenter.num_classes)) if out is None else out
    if tuple(labels.shape) != shape:
        raise ValueError(f"out has shape {tuple(labels.shape)}; expected the volume's {shape}.")
    probs = np.empty((segmenter.num_classes, *shape), dtype=np.float16) if probabilities else None
    channels = segmenter.spec.channels(segmenter.encoder)  # ``source`` may hold more levels (a prefix)
    try:
        for report, payload in source.chunks_job(device):
            yield report
            if payload is None:
                continue
            box, p = payload[0], _classify(segmenter.classifier, payload[1][:channels])
            del payload  # the chunk must not stay alive while the generator computes the next block
            labels[box] = p.argmax(0) + 1
            if probs is not None:
                probs[(slice(None), *box)] = p
            del p
    finally:
        release_memory(device)
    return labels, probs


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
    source = _features_for(segmenter, volume, features, settings)
    return (yield from _predict_job(segmenter, source, device, out, probabilities))


def _lazy_segmentation(segmenter: Segmenter, volume: da.Array, settings: dict, device):
    stats = intensity_stats(volume, segmenter.preset)

    def block_probabilities(block: np.ndarray) -> np.ndarray:
        source = segmenter.features(block, stats=stats, **settings)
        return run_job(_predict_job(segmenter, source, device, None, True))[1]

    halo = segmenter.spec.halo(segmenter.encoder)
    probabilities = lazy_blocks(volume, segmenter.num_classes, block_probabilities, dtype=np.float16, halo=halo)
    labels = (probabilities.argmax(0) + 1).astype(_labels_dtype(segmenter.num_classes))
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
    segmenter = Segmenter(
        encoder, classes, spec=FeatureSpec.from_dict(config["features"]), preset=config["preset"], classifier=forest
    )
    segmenter.trained_voxels = int(config.get("trained_voxels", 0))
    return segmenter
