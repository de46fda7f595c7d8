"""Classifier and feature levers of arm (c), side by side on the suite's strokes, in minutes.

    python benchmarks/strokes/levers.py                          # context tasks, every lever, seeds 0-2
    python benchmarks/strokes/levers.py --tasks head-ct --levers engine trees-64

The full suite (run.py) segments whole volumes and takes hours on 2 cores; a lever that only
changes the classifier, or transforms the features, does not need that. Per task, the
default segmenter's features (all its encoder levels) are sampled once on a grid of every
slice (every 3rd row and column, where the truth is defined) and at each seed's stroke
voxels (run.py's simulator); every lever then trains on the strokes and predicts the grid.
Dice as in run.py (mean over classes, near / far / all unpainted slices), on that grid: the
first round only, no corrective round. ``engine`` is (c) exactly (the engine's level choice
and forest); the other levers change one thing each. Writes results/levers.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from report import near_far_table
from run import STROKES, provenance, slice_sets
from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier
from tasks import TASKS

from napari_crossd.engine import Segmenter, prepare_model
from napari_crossd.engine.annotations import Annotations
from napari_crossd.engine.classifier import ForestClassifier
from napari_crossd.engine.jobs import run_job
from napari_crossd.engine.segmenter import choose_levels
from napari_crossd.evaluation import dice_scores, paint_strokes

HERE = Path(__file__).resolve().parent
GRID_STEP = 3
CPU = torch.device("cpu")


class TaskFeatures:
    """One task's features: ``grid`` rows (float16) with their truth and slice, and per seed
    the stroke voxels' rows, classes and cross-validation groups."""

    def __init__(self, task: str, seeds) -> None:
        sample = TASKS[task].load()
        truth = sample.labels
        self.segmenter = Segmenter(prepare_model("default"), sample.class_names)
        self.spec = self.segmenter.spec
        self.names = self.spec.names(self.segmenter.encoder)
        cache = self.segmenter.features(sample.image, spacing=sample.spacing)
        grid = np.zeros(truth.shape, dtype=bool)
        grid[:, ::GRID_STEP, ::GRID_STEP] = True
        coords = np.argwhere(grid & (truth > 0))
        self.truth, self.z = truth[tuple(coords.T)], coords[:, 0]
        self.classes = list(range(1, len(sample.class_names) + 1))
        self.rows = run_job(cache.columns_job(coords, CPU)).astype(np.float16)
        self.strokes = {}
        for seed in seeds:
            strokes = paint_strokes(truth, seed=seed, **STROKES)
            painted = Annotations.from_labels(strokes, num_classes=len(self.classes))
            columns = run_job(cache.columns_job(painted.coords, CPU))
            self.strokes[seed] = (strokes, columns, painted.classes, painted.groups())
        cache.columns.clear()

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


# name: (classifier factory, feature transform or None, encoder levels: "cv" = the engine's choice)
LEVERS = {
    "engine": (None, None, "cv"),
    "trees-64": (_forest(n_estimators=64), None, "cv"),
    "trees-100": (_forest(n_estimators=100), None, "cv"),
    "max-features-0.3": (_forest(max_features=0.3), None, "cv"),
    "no-class-weights": (_forest(class_weight=None), None, "cv"),
    "extra-trees": (_forest(kind=ExtraTreesClassifier), None, "cv"),
    "local-contrast": (_forest(), _local_contrast, "cv"),
    "levels-0": (_forest(), None, 0),
    "levels-1": (_forest(), None, 1),
    "levels-2": (_forest(), None, 2),
    "levels-4": (_forest(), None, 4),
}


def _predictor(make, transform, names: list[str], columns: np.ndarray, classes: np.ndarray, seed: int):
    """Train on the strokes' ``columns``; return a function from grid rows to classes."""
    if make is None:  # the engine's own forest
        forest = ForestClassifier(int(classes.max()), seed=seed).fit(columns, classes)
        return lambda rows: forest.predict_proba(rows).argmax(1) + 1
    prepare = (lambda rows: transform(rows, names)) if transform else (lambda rows: rows)
    classifier = make(seed).fit(prepare(columns), classes)
    return lambda rows: classifier.predict(prepare(rows))


def run_lever(features: TaskFeatures, lever: str, seed: int) -> dict:
    make, transform, levels = LEVERS[lever]
    strokes, columns, classes, groups = features.strokes[seed]
    if levels == "cv":
        spec, _ = choose_levels(columns, classes, groups, features.spec, features.segmenter.encoder, seed)
        levels = len(spec.levels)
    width = features.width(levels)
    start = time.perf_counter()
    predict = _predictor(make, transform, features.names[:width], columns[:, :width], classes, seed)
    rows, chunk = features.rows, 1 << 19
    predicted = np.concatenate([predict(rows[i : i + chunk, :width].astype(np.float32))
                                for i in range(0, len(rows), chunk)])
    result = {"lever": lever, "seed": seed, "levels": levels, "seconds": time.perf_counter() - start}
    for name, slices in slice_sets(strokes).items():
        where = np.isin(features.z, slices)
        per_class = dice_scores(predicted[where], features.truth[where], features.classes)
        result[name] = float(np.nanmean(list(per_class.values())))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    context = [name for name, task in TASKS.items() if task.context]
    parser.add_argument("--tasks", nargs="+", default=context, choices=list(TASKS))
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "levers.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = {}
    for task in args.tasks:
        features = TaskFeatures(task, args.seeds)
        results[task] = [run_lever(features, lever, seed) for seed in args.seeds for lever in args.levers]
        for r in results[task]:
            print(task, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
    lines = ["# Levers of arm (c) on the strokes suite's features", "",
             f"`python benchmarks/strokes/levers.py --tasks {' '.join(args.tasks)}` (protocol: its docstring); "
             f"seeds {', '.join(map(str, args.seeds))}; Dice (mean over classes) near / far, mean +- std over seeds, "
             f"on every {GRID_STEP}rd row and column of each slice.", "", provenance(), "",
             *near_far_table({task: {lever: [r for r in runs if r["lever"] == lever] for lever in args.levers}
                              for task, runs in results.items()}, "lever"), ""]
    args.out.write_text("\n".join(lines))
    (args.out.with_suffix(".json")).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
