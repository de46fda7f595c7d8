"""The methods compared on the same strokes: ours through the public API only, and two peers.

Every arm has ``fit(image, strokes, spacing)`` (the first Train), ``refit(image, strokes,
spacing)`` (the corrective round, all strokes so far) and ``predict(image, spacing)`` (the
full-volume label map, classes 1..N). The runner times each call.
"""

from __future__ import annotations

import dataclasses
import time
from typing import ClassVar

import numpy as np
import torch

STRATEGIES = ("centre", "i3d", "acs", "crossd")
WEIGHTS = ("default", "imagenet")

# The forests' settings, shared by both peers: ilastik's 100 trees; all else scikit-learn's
# defaults (unlimited depth, sqrt(features) per split, no class weights: the simulated
# strokes are balanced per class by construction).
FOREST = {"n_estimators": 100, "n_jobs": 2}

# scikit-image's filter bank at the scales the issue names (sigma 1, 2, 4, 8, 16 voxels):
# Gaussian, gradient magnitude and Hessian eigenvalues, as ilastik's pixel classification.
FILTERS = {"sigma_min": 1, "sigma_max": 16, "channel_axis": None}


class Ours:
    """napari-crossd as the widget runs it: ``Segmenter`` on ``prepare_model(weights, strategy)``,
    ``finetune`` (warm start on the corrective round: the same segmenter), ``segment``. Where
    the engine offers ``Segmenter.features`` (a cache of the volume's features that the widget
    keeps per image), it is made once at Train and passed to every call, as the widget does."""

    def __init__(self, class_names, seed: int, weights: str = "default", strategy: str | None = None,
                 full: bool = False, forest: dict | None = None, levels: tuple | None = None,
                 context: bool = True) -> None:
        self.class_names, self.seed = list(class_names), seed
        self.weights, self.strategy, self.full, self.forest = weights, strategy, full, forest or {}
        self.levels = levels  # None: the engine's default levels (and its cross-validated choice)
        self.context = context  # False: the first forest alone (no auto-context)
        self.segmenter = None
        self.cache: dict = {}
        self.summary: dict = {}

    def fit(self, image, strokes, spacing) -> None:
        from napari_crossd.engine import Segmenter, finetune, prepare_model
        from napari_crossd.engine.classifier import ForestClassifier

        torch.manual_seed(self.seed)  # the head's initialisation and dropout
        kwargs = {} if self.strategy is None else {"strategy": self.strategy}
        classifier = ForestClassifier(len(self.class_names), **self.forest) if self.forest else None
        context = {} if self.context else {"context": None}
        self.segmenter = Segmenter(prepare_model(self.weights, **kwargs), self.class_names, classifier=classifier,
                                   **context)
        if self.levels is not None:
            self.segmenter.spec = dataclasses.replace(self.segmenter.spec, levels=tuple(self.levels))
        if callable(getattr(self.segmenter, "features", None)):
            self.cache = {"features": self.segmenter.features(image, spacing=spacing)}
        self.summary = finetune(self.segmenter, image, strokes, spacing=spacing, **self._full(), **self.cache)

    def refit(self, image, strokes, spacing) -> None:
        from napari_crossd.engine import finetune

        self.summary = finetune(self.segmenter, image, strokes, spacing=spacing, **self._full(), **self.cache)

    def predict(self, image, spacing) -> np.ndarray:
        from napari_crossd.engine import segment

        labels, _ = segment(self.segmenter, image, spacing=spacing, **self.cache)
        return np.asarray(labels)

    def _full(self) -> dict:
        return {"full": True} if self.full else {}

    def info(self) -> dict:
        describe = getattr(self.segmenter, "describe", None)
        features = describe() if callable(describe) else getattr(self.segmenter, "hypercolumn", None)
        summary = {k: v for k, v in self.summary.items() if _plain(v)}
        if "context" in self.summary:  # whether auto-context was kept, and its cross-validation
            summary["context"] = self.summary["context"]
        return {"hypercolumn": features, "summary": summary}


class Regated(Ours):
    """Screen: (c) whose corrective round decides auto-context again on all strokes (the
    engine keeps the first training's choice). The forests are refit from all strokes in
    either case; only the gate differs, so the refit starts from a fresh segmenter of the
    same features with the level choice held at the first round's."""

    def refit(self, image, strokes, spacing) -> None:
        from napari_crossd.engine import Segmenter, finetune
        from napari_crossd.engine import segmenter as engine

        # The engine re-decides the gate only together with the levels (a first training); holding
        # choose_levels here keeps this screen out of the engine, where it did not win.
        first = self.segmenter
        self.segmenter = Segmenter(first.encoder, self.class_names, spec=first.spec,
                                   classifier=first.classifier.unfitted(self.seed), context=first.context)
        held, engine.choose_levels = engine.choose_levels, lambda columns, classes, groups, spec, *_: (spec, None)
        try:
            self.summary = finetune(self.segmenter, image, strokes, spacing=spacing, **self.cache)
        finally:
            engine.choose_levels = held


def _plain(value) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def _forest(seed: int):
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(random_state=seed, **FOREST)


def _predict_rows(forest, rows: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """``forest.predict`` in chunks of voxels: its class probabilities of a whole volume at once are large."""
    return np.concatenate([forest.predict(rows[i : i + chunk]) for i in range(0, len(rows), chunk)])


class FilterForest:
    """Peer (a), ilastik's pixel classification: a 3D filter bank + a random forest.

    The filter bank of a volume is computed once and reused by later seeds and tasks on the
    same volume (as ilastik caches it); its time is counted in every first Train.
    """

    _cache: ClassVar[dict] = {}  # {volume key: (features, wall s, CPU s)}

    def __init__(self, class_names, seed: int) -> None:
        self.seed = seed
        self.forest = None
        self.features_s = 0.0
        self.credit_s = self.credit_cpu_s = 0.0  # feature time the first Train did not spend (cached)

    def _features(self, image) -> tuple[np.ndarray, bool]:
        from skimage.feature import multiscale_basic_features

        key = (image.shape, image.dtype.str, hash(image.tobytes()))
        cached = key in FilterForest._cache
        if not cached:
            FilterForest._cache.clear()  # one volume's features at a time: they are large
            start, cpu = time.perf_counter(), time.process_time()
            features = multiscale_basic_features(image.astype(np.float32), **FILTERS).astype(np.float32)
            FilterForest._cache[key] = (features, time.perf_counter() - start, time.process_time() - cpu)
        features, self.features_s, self.features_cpu_s = FilterForest._cache[key]
        return features, cached

    def fit(self, image, strokes, spacing) -> None:
        features, cached = self._features(image)
        if self.forest is None and cached:
            self.credit_s, self.credit_cpu_s = self.features_s, self.features_cpu_s
        painted = strokes > 0
        self.forest = _forest(self.seed).fit(features[painted], strokes[painted])

    refit = fit  # ilastik retrains its forest from all the labels

    def predict(self, image, spacing) -> np.ndarray:
        features, _ = self._features(image)
        labels = _predict_rows(self.forest, features.reshape(-1, features.shape[-1]))
        return labels.reshape(image.shape).astype(np.uint8)

    def info(self) -> dict:
        return {"features_s": self.features_s, "features_credited_s": self.credit_s}


def _unit(image: np.ndarray) -> np.ndarray:
    """Grey values in [0, 1]: the -1000..1000 HU window for CT, else the 0.5..99.5 percentiles."""
    if float(image.min()) < -500:  # Hounsfield units
        low, high = -1000.0, 1000.0
    else:
        low, high = (float(v) for v in np.percentile(image[::2, ::2, ::2], (0.5, 99.5)))
    return np.clip((image.astype(np.float32) - low) / max(high - low, 1e-6), 0, 1)


class SliceForest:
    """Peer (b), Convpaint's way: the 2D ImageNet MobileNetV2 slice by slice along axis 0, its
    levels at strides 2-16 upsampled bilinearly to the slice, the grey value, a random forest."""

    max_stride = 16

    def __init__(self, class_names, seed: int) -> None:
        from napari_crossd.io import load_model
        from napari_crossd.models import IMAGENET_NORMALIZATION

        self.seed = seed
        self.model = load_model("imagenet").eval()
        self.mean = torch.tensor(IMAGENET_NORMALIZATION.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_NORMALIZATION.std).view(1, 3, 1, 1)
        taps = [info["module"] for info in self.model.feature_info if info["reduction"] <= self.max_stride]
        self.taps = [int(name.split(".")[1]) for name in taps]  # indices into model.features
        self.forest = None
        self.rows: dict[int, np.ndarray] = {}  # features of painted slices, kept for the refit
        self.unit = None

    @torch.no_grad()
    def slice_features(self, planes: np.ndarray) -> np.ndarray:
        """(B * H * W, channels) features of slices (B, H, W) in [0, 1], one batch through the network."""
        grey = torch.from_numpy(np.ascontiguousarray(planes))[:, None]
        x = (grey.expand(-1, 3, -1, -1) - self.mean) / self.std
        maps = [grey]
        for i, layer in enumerate(self.model.features[: self.taps[-1] + 1]):
            x = layer(x)
            if i in self.taps:
                maps.append(torch.nn.functional.interpolate(x, size=planes.shape[1:], mode="bilinear"))
        stacked = torch.cat(maps, 1)
        return stacked.permute(0, 2, 3, 1).reshape(-1, stacked.shape[1]).numpy()

    def fit(self, image, strokes, spacing) -> None:
        self.unit = _unit(image)
        rows, targets = [], []
        for z in np.flatnonzero((strokes > 0).any(axis=(1, 2))):
            if z not in self.rows:
                self.rows[z] = self.slice_features(self.unit[z : z + 1])
            painted = (strokes[z] > 0).ravel()
            rows.append(self.rows[z][painted])
            targets.append(strokes[z].ravel()[painted])
        self.forest = _forest(self.seed).fit(np.concatenate(rows), np.concatenate(targets))

    refit = fit  # from all strokes, reusing the features of slices painted before

    def predict(self, image, spacing) -> np.ndarray:
        unit = self.unit if self.unit is not None and self.unit.shape == image.shape else _unit(image)
        labels = np.empty(image.shape, dtype=np.uint8)
        step = max(1, (1 << 18) // (image.shape[1] * image.shape[2]))  # slices per batch: ~256k voxels
        for z in range(0, image.shape[0], step):
            rows = self.slice_features(unit[z : z + step])
            labels[z : z + step] = self.forest.predict(rows).reshape(-1, *image.shape[1:])
        return labels

    def info(self) -> dict:
        return {"levels_up_to_stride": self.max_stride}


# What the default forests weighed classes by until 2026-12-02 16:30 UTC: arms recorded before
# then keep it, so that they run as they were recorded.
WEIGHTED = {"class_weight": "balanced_subsample"}
SQRT = {"max_features": "sqrt", **WEIGHTED}


def make_arm(name: str, class_names, seed: int):
    """``filters-forest`` (a), ``slices-forest`` (b), ``default`` (c); the default with one
    change: ``default-weighted`` (classes weighed by their strokes, the default from
    2026-12-02 13:10 to 16:30), ``trees-64`` (that, with 64 trees); ``default-sqrt`` and
    ``context-no-levels`` (that, trying sqrt(channels) per split: the default from 12:40 to
    13:10; and with the filter bank alone), ``default-no-levels-0.3`` (the 13:10 default with the
    filter bank alone), ``default-no-context`` (the first forest alone, sqrt, weighted); or,
    recorded before auto-context and run without it (sqrt(channels) per split and weighted
    classes unless said): ``default-full``, ``default-features-0.3``, ``default-unweighted``
    (the forest without class weights), ``default-no-levels`` and ``WEIGHTS-STRATEGY`` (d),
    e.g. ``imagenet-acs``."""
    if name == "filters-forest":
        return FilterForest(class_names, seed)
    if name == "slices-forest":
        return SliceForest(class_names, seed)
    ours = {
        "default": {},
        "default-weighted": {"forest": WEIGHTED},
        "trees-64": {"forest": {"trees": 64, **WEIGHTED}},
        "default-sqrt": {"forest": SQRT},
        "context-no-levels": {"levels": (), "forest": SQRT},
        "default-no-levels-0.3": {"levels": (), "forest": WEIGHTED},
        "default-no-context": {"context": False, "forest": SQRT},
        "default-full": {"full": True, "context": False, "forest": SQRT},
        "default-features-0.3": {"forest": {**SQRT, "max_features": 0.3}, "context": False},
        "default-unweighted": {"forest": {**SQRT, "class_weight": None}, "context": False},
        "default-no-levels": {"levels": (), "context": False, "forest": SQRT},
    }
    if name in ours:
        return Ours(class_names, seed, **ours[name])
    if name == "regate-context":
        return Regated(class_names, seed)
    weights, _, strategy = name.partition("-")
    if weights in WEIGHTS and strategy in STRATEGIES:
        return Ours(class_names, seed, weights=weights, strategy=strategy, context=False, forest=SQRT)
    raise ValueError(f"unknown arm {name!r}")


BASELINES = ("filters-forest", "slices-forest")
DEFAULT_ARMS = (*BASELINES, "default")
STRATEGY_ARMS = tuple(f"{w}-{s}" for w in WEIGHTS for s in STRATEGIES)
FOREST_ARMS = ("regate-context", "default-weighted", "trees-64", "default-sqrt", "context-no-levels",
               "default-no-levels-0.3", "default-no-context", "default-features-0.3", "default-unweighted",
               "default-no-levels")
ALL_ARMS = (*DEFAULT_ARMS, "default-full", *FOREST_ARMS, *STRATEGY_ARMS)
