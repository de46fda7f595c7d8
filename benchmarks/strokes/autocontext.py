"""Auto-context on the strokes suite: a second forest that also reads the first one's smoothed class maps.

    python benchmarks/strokes/autocontext.py                          # context tasks, seeds 0-2
    python benchmarks/strokes/autocontext.py --tasks nuclei-parts --sigmas 1 2 4

ilastik's auto-context: stage 1 is a forest on the voxel features; stage 2 is a forest on the
same features plus stage 1's class probabilities, Gaussian-smoothed at a few scales, so that
it can learn where a class lies relative to the others (a nucleus' boundary surrounds its
interior; deep grey matter is wrapped in white matter). Arms on run.py's strokes and
the engine's features, side by side:

- ``engine``: the segmenter as the widget trains it without auto-context (stage 1 only);
- ``auto-context``: stage 2 trained on stage 1's maps at the painted voxels, which stage 1
  was trained on, so they are nearly always right there;
- ``cross-fitted``: at the voxels of each painted plane, the maps come from a forest trained
  on the other planes' strokes (predicted in a slab of 3 sigma around the plane), so stage 2
  learns how far to trust maps on slices it has not seen. Prediction reads stage 1's maps.
- ``coarse``: cross-fitted, with stage 1's maps computed on every 2nd voxel of each axis,
  smoothed there and trilinearly upsampled: what the engine does (:mod:`napari_crossd.engine.context`);
- ``distance``: cross-fitted, but stage 2 reads each class's signed distance (clipped at 32
  of the finest voxel size) from stage 1's labels on that grid instead of smoothed maps;
- ``both``: smoothed maps and distances.

``--max-features`` sets every forest's ``max_features``; ``--arms`` picks arms (``engine`` always runs).

Dice as in run.py (mean over classes; near / far / all unpainted slices), first round only.
The whole volume's features are held in memory (about 200^3 voxels x 31-71 channels): a
measurement, not how the engine would do it. Writes results/autocontext.md and .json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from report import near_far_table
from run import STROKES, provenance, scores, slice_sets
from scipy import ndimage
from tasks import TASKS

from napari_crossd.engine import Segmenter, finetune, prepare_model
from napari_crossd.engine.annotations import Annotations
from napari_crossd.engine.classifier import ForestClassifier
from napari_crossd.evaluation import paint_strokes

HERE = Path(__file__).resolve().parent
CPU = torch.device("cpu")
ARMS = ("engine", "auto-context", "cross-fitted", "distance", "both", "coarse")
CAP_VOXELS = 32  # class distances are clipped at 32 of the finest voxel size
FOREST = {}  # ForestClassifier settings of every forest here (--max-features)
STRIDE = 2  # class distances are computed on every 2nd voxel of each axis, then repeated


def volume_features(segmenter: Segmenter, cache, shape) -> np.ndarray:
    """The segmenter's features of every voxel, ``(C, Z, Y, X)`` float32."""
    out = np.empty((segmenter.spec.channels(segmenter.encoder), *shape), np.float32)
    for _, payload in cache.chunks_job(CPU, segmenter.spec):
        if payload is not None:
            out[(slice(None), *payload[0])] = payload[1].numpy()
    return out


def probabilities(forest: ForestClassifier, features: np.ndarray) -> np.ndarray:
    """Class maps ``(N, Z, Y, X)`` of features ``(C, Z, Y, X)``, a million voxels at a time."""
    rows, chunk = features.reshape(len(features), -1).T, 1 << 20
    p = np.concatenate([forest.predict_proba(np.ascontiguousarray(rows[i : i + chunk]))
                        for i in range(0, len(rows), chunk)])
    return p.T.reshape(-1, *features.shape[1:])


def smoothed(maps: np.ndarray, sigmas) -> np.ndarray:
    """Every class map at every scale (voxels), ``(N * len(sigmas), Z, Y, X)``."""
    return np.stack([ndimage.gaussian_filter(m, s, mode="nearest") for m in maps for s in sigmas])


def class_distances(labels: np.ndarray, classes: int, spacing, cap: float) -> np.ndarray:
    """Signed distance (spacing units, clipped to +-cap) of every voxel to each class' region, ``(N, Z, Y, X)``.

    Positive outside the class, negative inside; a class absent from ``labels`` reads ``cap``.
    """
    out = np.full((classes, *labels.shape), cap, np.float32)
    for k in range(classes):
        inside = labels == k + 1
        if inside.any():
            d = ndimage.distance_transform_edt(~inside, sampling=spacing) - ndimage.distance_transform_edt(
                inside, sampling=spacing)
            out[k] = np.clip(d, -cap, cap)
    return out


def coarse_distances(forest, features, classes, spacing, cap) -> np.ndarray:
    """:func:`class_distances` of the forest's labels on the stride grid, repeated back to full size."""
    grid = features[:, ::STRIDE, ::STRIDE, ::STRIDE]
    labels = probabilities(forest, np.ascontiguousarray(grid)).argmax(0) + 1
    d = class_distances(labels, classes, [s * STRIDE for s in spacing], cap)
    for axis in (1, 2, 3):
        d = np.repeat(d, STRIDE, axis=axis)
    return d[:, : features.shape[1], : features.shape[2], : features.shape[3]]


def cross_fitted_distances(features, coords, classes, spacing, cap, seed: int) -> np.ndarray:
    """``(P, N)`` class distances at the painted voxels, each plane's from a forest without its strokes."""
    reach = int(np.ceil(cap / spacing[0])) + STRIDE
    columns = features[:, coords[:, 0], coords[:, 1], coords[:, 2]].T
    n = int(classes.max())
    out = np.empty((len(coords), n), np.float32)
    for z in np.unique(coords[:, 0]):
        held = coords[:, 0] == z
        forest = ForestClassifier(n, seed=seed).fit(columns[~held], classes[~held])
        low = max(0, (z - reach) // STRIDE * STRIDE)
        high = min(features.shape[1], z + reach + 1)
        d = coarse_distances(forest, features[:, low:high], n, spacing, cap)
        plane = coords[held]
        out[held] = d[:, plane[:, 0] - low, plane[:, 1], plane[:, 2]].T
    return out


def coarse_smoothed(forest, features, sigmas) -> np.ndarray:
    """:func:`smoothed` maps computed on the stride grid (sigmas / stride), trilinearly upsampled."""
    grid = np.ascontiguousarray(features[:, ::STRIDE, ::STRIDE, ::STRIDE])
    maps = smoothed(probabilities(forest, grid), [s / STRIDE for s in sigmas])
    t = torch.from_numpy(maps)[None]
    size = [(n - 1) // STRIDE * STRIDE + 1 for n in features.shape[1:]]  # grid points at i * STRIDE
    up = torch.nn.functional.interpolate(t, size=size, mode="trilinear", align_corners=True)[0]
    pad = [0, features.shape[3] - size[2], 0, features.shape[2] - size[1], 0, features.shape[1] - size[0]]
    return torch.nn.functional.pad(up[None], pad, mode="replicate")[0].numpy()


def cross_fitted_coarse(features, coords, classes, sigmas, seed: int) -> np.ndarray:
    """As :func:`cross_fitted_context`, the maps from :func:`coarse_smoothed`."""
    reach = int(3 * max(sigmas)) + 1 + STRIDE
    columns = features[:, coords[:, 0], coords[:, 1], coords[:, 2]].T
    out = np.empty((len(coords), int(classes.max()) * len(sigmas)), np.float32)
    for z in np.unique(coords[:, 0]):
        held = coords[:, 0] == z
        forest = ForestClassifier(int(classes.max()), seed=seed, **FOREST).fit(columns[~held], classes[~held])
        low = max(0, (z - reach) // STRIDE * STRIDE)
        high = min(features.shape[1], z + reach + 1)
        maps = coarse_smoothed(forest, features[:, low:high], sigmas)
        plane = coords[held]
        out[held] = maps[:, plane[:, 0] - low, plane[:, 1], plane[:, 2]].T
    return out


def cross_fitted_context(features, coords, classes, sigmas, seed: int) -> np.ndarray:
    """``(P, N * len(sigmas))`` maps at the painted voxels, each plane's from a forest without its strokes."""
    reach = int(3 * max(sigmas)) + 1
    columns = features[:, coords[:, 0], coords[:, 1], coords[:, 2]].T
    out = np.empty((len(coords), int(classes.max()) * len(sigmas)), np.float32)
    for z in np.unique(coords[:, 0]):
        held = coords[:, 0] == z
        forest = ForestClassifier(int(classes.max()), seed=seed, **FOREST).fit(columns[~held], classes[~held])
        low, high = max(0, z - reach), min(features.shape[1], z + reach + 1)
        maps = smoothed(probabilities(forest, features[:, low:high]), sigmas)
        plane = coords[held]
        out[held] = maps[:, plane[:, 0] - low, plane[:, 1], plane[:, 2]].T
    return out


def second_stage(features, context, train_context, coords, classes, seed: int) -> np.ndarray:
    """Labels of a forest on the features plus ``context`` maps, trained with ``train_context`` at ``coords``."""
    columns = features[:, coords[:, 0], coords[:, 1], coords[:, 2]].T
    forest = ForestClassifier(int(classes.max()), seed=seed, **FOREST)
    forest.fit(np.concatenate([columns, train_context], 1), classes)
    return probabilities(forest, np.concatenate([features, context])).argmax(0) + 1


def run_seed(sample, seed: int, sigmas, arms) -> dict[str, dict]:
    truth, names = sample.labels, sample.class_names
    strokes = paint_strokes(truth, seed=seed, **STROKES)
    segmenter = Segmenter(prepare_model("default"), names, classifier=ForestClassifier(len(names), **FOREST),
                          context=None)  # stage 1: the arms below add their own second stage
    cache = segmenter.features(sample.image, spacing=sample.spacing)
    finetune(segmenter, sample.image, strokes, spacing=sample.spacing, features=cache)
    features = volume_features(segmenter, cache, sample.image.shape)
    painted = Annotations.from_labels(strokes, num_classes=len(names))
    coords, classes = painted.coords, painted.classes
    first = probabilities(segmenter.classifier, features)
    n, cap = len(names), CAP_VOXELS * min(sample.spacing)

    def smoothed_pair():
        return smoothed(first, sigmas), cross_fitted_context(features, coords, classes, sigmas, seed)

    def distance_pair():
        return (coarse_distances(segmenter.classifier, features, n, sample.spacing, cap),
                cross_fitted_distances(features, coords, classes, sample.spacing, cap, seed))

    def in_sample():
        context = smoothed(first, sigmas)
        return context, context[:, coords[:, 0], coords[:, 1], coords[:, 2]].T

    def both():
        (a, a_train), (b, b_train) = smoothed_pair(), distance_pair()
        return np.concatenate([a, b]), np.concatenate([a_train, b_train], 1)

    contexts = {"auto-context": in_sample, "cross-fitted": smoothed_pair, "distance": distance_pair, "both": both,
                "coarse": lambda: (coarse_smoothed(segmenter.classifier, features, sigmas),
                                   cross_fitted_coarse(features, coords, classes, sigmas, seed))}
    labels = {"engine": first.argmax(0) + 1}
    for arm in arms:
        if arm != "engine":
            labels[arm] = second_stage(features, *contexts[arm](), coords, classes, seed)
    ids = list(range(1, len(names) + 1))
    return {arm: {name: scores(labels[arm], truth, zs, ids)["mean"] for name, zs in slice_sets(strokes).items()}
            | {"levels": len(segmenter.spec.levels)} for arm in labels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    context = [name for name, task in TASKS.items() if task.context]
    parser.add_argument("--tasks", nargs="+", default=context, choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--sigmas", nargs="+", type=float, default=[1.0, 2.0, 4.0])
    parser.add_argument("--max-features", default=None, help="every forest's max_features (default: the engine's)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "autocontext.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.max_features is not None:
        FOREST["max_features"] = float(args.max_features) if args.max_features[0].isdigit() else args.max_features
    results, arms = {}, ["engine", *[a for a in args.arms if a != "engine"]]
    for task in args.tasks:
        sample = TASKS[task].load()
        results[task] = [{"seed": seed, **run_seed(sample, seed, args.sigmas, args.arms)} for seed in args.seeds]
        for r in results[task]:
            print(task, json.dumps(r), flush=True)
    lines = ["# Auto-context on the strokes suite", "",
             f"`python benchmarks/strokes/autocontext.py --tasks {' '.join(args.tasks)} --sigmas "
             f"{' '.join(f'{s:g}' for s in args.sigmas)}` (protocol: its docstring); seeds "
             f"{', '.join(map(str, args.seeds))}; Dice (mean over classes) near / far, mean +- std over seeds.", "",
             provenance(), "",
             *near_far_table({task: {arm: [r[arm] for r in runs] for arm in arms} for task, runs in results.items()},
                             "arm"), ""]
    args.out.write_text("\n".join(lines))
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
