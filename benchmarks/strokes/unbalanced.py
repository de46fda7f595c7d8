"""Strokes of one class painted five times as much: what class weights are for.

    python benchmarks/strokes/unbalanced.py                  # 4 tasks, seeds 0-2, default-weighted and default
    python benchmarks/strokes/unbalanced.py --arms default filters-forest --tasks nuclei-parts

run.py's simulated user paints every class alike (3 strokes per class on each painted slice),
so it cannot see what weighing classes by their strokes buys. Here the same strokes get 12
more strokes of class 1 (the background of every task: air, "rest") on the same slices, as a
user who sweeps the background generously and dabs the structures. Each arm trains once
(run.py's arms, through the public API) and is scored on the unpainted slices as in run.py,
first round only. Writes results/unbalanced.md and .json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from arms import ALL_ARMS, make_arm
from report import near_far_table
from run import STROKES, provenance, scores, slice_sets
from tasks import TASKS

from napari_crossd.evaluation import paint_strokes

HERE = Path(__file__).resolve().parent
EXTRA_STROKES = 12  # of class 1, on top of run.py's 3: five times as much background


def unbalanced_strokes(truth: np.ndarray, seed: int) -> np.ndarray:
    """run.py's strokes, plus ``EXTRA_STROKES`` more of class 1 where nothing is painted yet."""
    strokes = paint_strokes(truth, seed=seed, **STROKES)
    background = np.where(truth == 1, 1, 0).astype(truth.dtype)  # 0 is never painted: class 1 alone
    extra = paint_strokes(background, seed=seed + 1000, **{**STROKES, "strokes_per_class": EXTRA_STROKES})
    return np.where(strokes > 0, strokes, extra).astype(strokes.dtype)


def run_one(task: str, arm_name: str, seed: int, sample) -> dict:
    classes = list(range(1, len(sample.class_names) + 1))
    strokes = unbalanced_strokes(sample.labels, seed)
    arm = make_arm(arm_name, sample.class_names, seed)
    arm.fit(sample.image, strokes, sample.spacing)
    prediction = arm.predict(sample.image, sample.spacing)
    counts = {int(c): int((strokes == c).sum()) for c in classes}
    return {"task": task, "arm": arm_name, "seed": seed, "stroke_voxels": counts,
            **{name: scores(prediction, sample.labels, zs, classes) for name, zs in slice_sets(strokes).items()}}


def side_by_side(results: list[dict], tasks, arms, seeds) -> dict:
    """``{task: {row: [{"near", "far"} per seed]}}``: each arm on these strokes, and on run.py's
    balanced strokes of the same seeds (its results/raw/ JSON, where recorded)."""
    rows = {}
    for task in tasks:
        rows[task] = {}
        for arm in arms:
            ours = [r for r in results if r["task"] == task and r["arm"] == arm]
            rows[task][f"{arm}, unbalanced"] = [{k: r[k]["mean"] for k in ("near", "far")} for r in ours]
            balanced = [HERE / "results" / "raw" / f"{task}__{arm}__seed{s}.json" for s in seeds]
            if all(p.exists() for p in balanced):
                runs = [json.loads(p.read_text())["round1"] for p in balanced]
                rows[task][f"{arm}, balanced (run.py)"] = [{k: r[k]["mean"] for k in ("near", "far")} for r in runs]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["nuclei-parts", "nuclei", "mni152-deep-grey", "head-ct"],
                        choices=list(TASKS))
    parser.add_argument("--arms", nargs="+", default=["default-weighted", "default"], choices=list(ALL_ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = []
    for task in args.tasks:
        sample = TASKS[task].load()
        for seed in args.seeds:
            for arm in args.arms:
                results.append(run_one(task, arm, seed, sample))
                r = results[-1]
                print(f"{task:17s} {arm:19s} seed {seed}: near {r['near']['mean']:.3f} far {r['far']['mean']:.3f}"
                      f"  strokes per class {r['stroke_voxels']}", flush=True)
    (HERE / "results" / "unbalanced.json").write_text(json.dumps(results, indent=1))
    table = near_far_table(side_by_side(results, args.tasks, args.arms, args.seeds), "arm, strokes")
    command = " ".join(["python benchmarks/strokes/unbalanced.py", "--tasks", *args.tasks, "--arms", *args.arms])
    text = [f"# {__doc__.splitlines()[0]}", "", f"`{command}` (protocol: its docstring); seeds "
            f"{', '.join(map(str, args.seeds))}; Dice (mean over classes), first round, mean +- std over seeds.", "",
            provenance(), "", *table, ""]
    (HERE / "results" / "unbalanced.md").write_text("\n".join(text))


if __name__ == "__main__":
    main()
