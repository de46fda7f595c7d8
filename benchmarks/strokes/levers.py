"""Classifier and feature levers of arm (c), side by side on the suite's strokes, in minutes.

    python benchmarks/strokes/levers.py                          # context tasks, every lever, seeds 0-2
    python benchmarks/strokes/levers.py --tasks head-ct --levers engine trees-64
    python benchmarks/strokes/levers.py --corrective      # also the corrective round

The full suite (run.py) segments whole volumes and takes hours on 2 cores; a lever that only
changes the classifier, or transforms the features, does not need that. Per task, the
default segmenter's features (all its encoder levels) are sampled once on a grid of every
slice (every 3rd row and column, where the truth is defined) and at each seed's stroke
voxels (run.py's simulator); every lever then trains on the strokes and predicts the grid.
Dice as in run.py (mean over classes, near / far / all unpainted slices), on that grid: the
first round only unless ``--corrective``: then also run.py's corrective round on the grid
(strokes of one grid step's brush in the 2 worst unpainted grid slices, all strokes refit,
Dice before and after on the slices unpainted in both rounds; ``results/levers_corrective.md``).
``engine`` is (c) exactly (the engine's level choice and forest); the other levers change
one thing each. Writes results/levers.md.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from report import near_far_table
from run import CORRECTIONS, STROKES, provenance, slice_sets
from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier
from tasks import TASKS

from napari_crossd.engine import Segmenter, prepare_model
from napari_crossd.engine.annotations import Annotations
from napari_crossd.engine.classifier import ForestClassifier
from napari_crossd.engine.jobs import run_job
from napari_crossd.engine.segmenter import choose_levels
from napari_crossd.evaluation import dice_scores, paint_corrections, paint_strokes

HERE = Path(__file__).resolve().parent
GRID_STEP = 3
CPU = torch.device("cpu")


class TaskFeatures:
    """One task's features: ``grid`` rows (float16) with their truth and slice, and per seed
    the stroke voxels' rows, classes and cross-validation groups."""

    def __init__(self, task: str, seeds) -> None:
        sample = TASKS[task].load()
        truth = sample.labels
        # The first forest's features and levels; the levers replace the classifier (no auto-context).
        self.segmenter = Segmenter(prepare_model("default"), sample.class_names, context=None)
        self.spec = self.segmenter.spec
        self.names = self.spec.names(self.segmenter.encoder)
        cache = self.segmenter.features(sample.image, spacing=sample.spacing)
        grid = np.zeros(truth.shape, dtype=bool)
        grid[:, ::GRID_STEP, ::GRID_STEP] = True
        coords = np.argwhere(grid & (truth > 0))
        self.truth, self.z = truth[tuple(coords.T)], coords[:, 0]
        self.grid_shape = truth.shape[0], int(grid[0, :, 0].sum()), int(grid[0, 0].sum())
        self.at = (coords[:, 0], coords[:, 1] // GRID_STEP, coords[:, 2] // GRID_STEP)  # each row on the grid
        self.classes = list(range(1, len(sample.class_names) + 1))
        self.rows = run_job(cache.columns_job(coords, CPU)).astype(np.float16)
        self.strokes = {}
        for seed in seeds:
            strokes = paint_strokes(truth, seed=seed, **STROKES)
            painted = Annotations.from_labels(strokes, num_classes=len(self.classes))
            columns = run_job(cache.columns_job(painted.coords, CPU))
            self.strokes[seed] = (strokes, columns, painted.classes, painted.groups())
        cache.columns.clear()

    def on_grid(self, values: np.ndarray) -> np.ndarray:
        """Per-row ``values`` as a (Z, Y / 3, X / 3) volume on the grid, 0 where no row is."""
        volume = np.zeros(self.grid_shape, dtype=np.uint8)
        volume[self.at] = values
        return volume

    def width(self, levels: int) -> int:
        """Channels of the grey value, the filter bank and the first ``levels`` encoder levels."""
        return type(self.spec)(self.spec.levels[:levels], self.spec.sigmas, self.spec.sets).channels(
            self.segmenter.encoder)


def _forest(**settings):
    settings = {"n_estimators": 32, "class_weight": "balanced_subsample", "n_jobs": 2, **settings}
    kind = settings.pop("kind", RandomForestClassifier)
    return lambda seed: kind(random_state=seed, **settings)


def _local_contrast(rows: np.ndarray, names: list[str]) -> np.ndarray:
    """The filter responses also divided by the local mean grey value (Gaussian, sigma 8)."""
    filters = [i for i, n in enumerate(names) if not n.startswith("level ")]
    mean = np.abs(rows[:, names.index("gaussian s=8")])[:, None] + 0.05
    return np.concatenate([rows, rows[:, filters] / mean], 1)


class Lever(NamedTuple):
    """One change to arm (c); the defaults are (c) itself."""

    make: Callable | None = None  # a scikit-learn classifier factory (seed -> classifier); None: the engine's forest
    transform: Callable | None = None  # (rows, channel names) -> rows
    levels: int | str = "cv"  # encoder levels kept; "cv": the engine's cross-validated choice
    self_training: bool = False  # also train on the first forest's confident grid voxels
    correction_weight: int = 1  # corrective round: each corrective row counts this many times
    rechoose_levels: bool = False  # corrective round: choose the levels again on all strokes


LEVERS = {
    "engine": Lever(),
    "trees-64": Lever(_forest(n_estimators=64)),
    "trees-100": Lever(_forest(n_estimators=100)),
    "max-features-0.3": Lever(_forest(max_features=0.3)),
    "no-class-weights": Lever(_forest(class_weight=None)),
    "extra-trees": Lever(_forest(kind=ExtraTreesClassifier)),
    "local-contrast": Lever(_forest(), _local_contrast),
    "levels-0": Lever(_forest(), levels=0),
    "levels-1": Lever(_forest(), levels=1),
    "levels-2": Lever(_forest(), levels=2),
    "levels-4": Lever(_forest(), levels=4),
    "self-training": Lever(self_training=True),
    "correction-weight-3": Lever(correction_weight=3),
    "rechoose-levels": Lever(rechoose_levels=True),
}


def _predictor(make, transform, names: list[str], columns: np.ndarray, classes: np.ndarray, seed: int):
    """Train on the strokes' ``columns``; return a function from grid rows to classes."""
    if make is None:  # the engine's own forest
        forest = ForestClassifier(int(classes.max()), seed=seed).fit(columns, classes)
        return lambda rows: forest.predict_proba(rows).argmax(1) + 1
    prepare = (lambda rows: transform(rows, names)) if transform else (lambda rows: rows)
    classifier = make(seed).fit(prepare(columns), classes)
    return lambda rows: classifier.predict(prepare(rows))


# Self-training: stage 1's confident grid voxels (probability >= 0.9), at most this many per
# predicted class, join the strokes as labels for a second forest (transductive: the engine
# predicts the user's whole volume anyway).
CONFIDENT, PSEUDO_PER_CLASS = 0.9, 5000


def _self_trained(columns: np.ndarray, classes: np.ndarray, rows: np.ndarray, seed: int) -> np.ndarray:
    """Labels of the grid ``rows`` from a forest on the strokes plus stage 1's confident voxels."""
    num_classes = int(classes.max())
    first = _chunked(ForestClassifier(num_classes, seed=seed).fit(columns, classes).predict_proba, rows)
    confidence, predicted = first.max(1), first.argmax(1) + 1
    rng = np.random.default_rng(seed)
    picks = []
    for c in range(1, num_classes + 1):
        confident = np.flatnonzero((predicted == c) & (confidence >= CONFIDENT))
        picks.append(rng.choice(confident, min(len(confident), PSEUDO_PER_CLASS), replace=False))
    picks = np.concatenate(picks)
    second = ForestClassifier(num_classes, seed=seed).fit(
        np.concatenate([columns, rows[picks].astype(np.float32)]), np.concatenate([classes, predicted[picks]]))
    return _chunked(second.predict_proba, rows).argmax(1) + 1


def _chunked(predict, rows: np.ndarray, chunk: int = 1 << 19) -> np.ndarray:
    return np.concatenate([predict(rows[i : i + chunk].astype(np.float32)) for i in range(0, len(rows), chunk)])


def _labels(features: TaskFeatures, lever: str, columns: np.ndarray, classes: np.ndarray, seed: int) -> np.ndarray:
    """The grid rows' classes from ``lever`` trained on ``columns`` (their width: the channels used)."""
    settings, rows = LEVERS[lever], features.rows[:, : columns.shape[1]]
    if settings.self_training:
        return _self_trained(columns, classes, rows, seed)
    names = features.names[: columns.shape[1]]
    return _chunked(_predictor(settings.make, settings.transform, names, columns, classes, seed), rows)


def _dice(features: TaskFeatures, predicted: np.ndarray, slices: np.ndarray) -> float:
    where = np.isin(features.z, slices)
    return float(np.nanmean(list(dice_scores(predicted[where], features.truth[where], features.classes).values())))


def run_lever(features: TaskFeatures, lever: str, seed: int, corrective: bool = False) -> dict:
    strokes, columns, classes, groups = features.strokes[seed]
    levels = LEVERS[lever].levels
    if levels == "cv":
        spec, _ = choose_levels(columns, classes, groups, features.spec, features.segmenter.encoder, seed)
        levels = len(spec.levels)
    columns = columns[:, : features.width(levels)]
    start = time.perf_counter()
    first = _labels(features, lever, columns, classes, seed)
    result = {"lever": lever, "seed": seed, "levels": levels, "seconds": time.perf_counter() - start}
    result |= {name: _dice(features, first, slices) for name, slices in slice_sets(strokes).items()}
    if corrective:
        result |= _corrective_round(features, lever, seed, levels, first)
    return result


def _corrective_round(features, lever, seed, levels, first) -> dict:
    """run.py's corrective round on the grid: strokes in the 2 worst unpainted grid slices
    (a brush of one grid step), all strokes refit, Dice before and after on the slices
    unpainted in both rounds."""
    strokes, columns, classes, groups = features.strokes[seed]
    corrections = paint_corrections(features.on_grid(features.truth), features.on_grid(first),
                                    strokes[:, ::GRID_STEP, ::GRID_STEP], seed=seed, **CORRECTIONS)
    corrected = corrections[features.at]
    picked = np.repeat(np.flatnonzero(corrected), LEVERS[lever].correction_weight)
    columns = np.concatenate([columns, features.rows[picked].astype(np.float32)])
    classes = np.concatenate([classes, corrected[picked]])
    if LEVERS[lever].rechoose_levels:
        groups = np.concatenate([groups, features.z[picked]])
        levels = len(choose_levels(columns, classes, groups, features.spec, features.segmenter.encoder, seed)[0].levels)
    second = _labels(features, lever, columns[:, : features.width(levels)], classes, seed)
    kept = np.setdiff1d(slice_sets(strokes)["all"], np.flatnonzero(corrections.any(axis=(1, 2))))
    before, after = _dice(features, first, kept), _dice(features, second, kept)
    return {"before": before, "after": after, "gain": after - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    context = [name for name, task in TASKS.items() if task.context]
    parser.add_argument("--tasks", nargs="+", default=context, choices=list(TASKS))
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--corrective", action="store_true",
                        help="also the corrective round on the grid (results/levers_corrective.md by default)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = args.out or HERE / "results" / ("levers_corrective.md" if args.corrective else "levers.md")
    torch.set_num_threads(2)
    results = {}
    for task in args.tasks:
        features = TaskFeatures(task, args.seeds)
        results[task] = [run_lever(features, lever, seed, args.corrective)
                         for seed in args.seeds for lever in args.levers]
        for r in results[task]:
            print(task, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
    by_lever = {task: {lever: [r for r in runs if r["lever"] == lever] for lever in args.levers}
                for task, runs in results.items()}
    lines = ["# Levers of arm (c) on the strokes suite's features", "",
             f"`python benchmarks/strokes/levers.py --tasks {' '.join(args.tasks)} --levers {' '.join(args.levers)}"
             f"{' --corrective' if args.corrective else ''}` (protocol: its docstring); "
             f"seeds {', '.join(map(str, args.seeds))}; Dice (mean over classes) near / far, mean +- std over seeds, "
             f"on every {GRID_STEP}rd row and column of each slice.", "", provenance(), "",
             *near_far_table(by_lever, "lever"), ""]
    if args.corrective:
        lines += ["Corrective round (Dice on the slices unpainted in both rounds):", "",
                  *near_far_table(by_lever, "lever", keys=("before", "after", "gain")), ""]
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
