"""The strokes benchmark: segmentation of real 3D volumes from a few simulated strokes.

    python benchmarks/strokes/run.py                      # tasks x arms (a, b, c) x seeds 0-2
    python benchmarks/strokes/run.py --arms default-full imagenet-acs ...   # more arms, later
    python benchmarks/strokes/run.py --quick              # small crops, results/quick/: a smoke run

Runs every (task, arm, seed) without a result in results/raw/ (one JSON each: a run
resumes, arms can be added later), then writes results/README.md from all of them.
Each result records which napari_crossd ran. To measure a commit while the checkout changes:
``git archive HEAD napari_crossd | tar -x -C /tmp/snap; git rev-parse --short HEAD >
/tmp/snap/COMMIT; cd /tmp && PYTHONPATH=/tmp/snap python /path/to/benchmarks/strokes/run.py``.
Delete the JSON files of an arm (``results/raw/*__default__*``) to measure it again.

Protocol, per task and stroke seed: 3 strokes per class (12-step random walks, brush radius
1, inside the class) on 5 axial slices evenly spaced over the middle 60 % of axis 0
(``evaluation.paint_strokes(span=(0.2, 0.8))``); Train; the full-volume labels. Dice per
class on the unpainted slices between the first and last painted one (near), beyond them
(far), and on all unpainted slices (all), where the ground truth is defined. Then the
corrective round: 3 strokes of every mispredicted class inside the misclassified voxels of
the 2 unpainted slices with the most errors (``evaluation.paint_corrections``), retrain on all
strokes (ours: the same segmenter, a warm start, as the widget; the forests: refit, as
ilastik), and the gain in Dice on the slices unpainted in both rounds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from arms import ALL_ARMS, DEFAULT_ARMS, make_arm
from report import write_report
from tasks import TASKS, quick

from napari_crossd.evaluation import dice_scores, paint_corrections, paint_strokes

HERE = Path(__file__).resolve().parent
STROKES = {"slices": 5, "strokes_per_class": 3, "length": 12, "radius": 1, "span": (0.2, 0.8)}
CORRECTIONS = {"worst": 2, "strokes_per_class": 3, "length": 12, "radius": 1}


def engine_version() -> str:
    """Which napari_crossd ran: a commit (``COMMIT`` beside a snapshot of the package, else git)."""
    import napari_crossd

    root = Path(napari_crossd.__file__).resolve().parents[1]
    if (root / "COMMIT").is_file():
        return f"{(root / 'COMMIT').read_text().strip()} (snapshot at {root})"
    git = ["git", "-C", str(root)]
    try:
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "napari_crossd"], capture_output=True, text=True).stdout
    except OSError:
        return str(root)
    return f"{commit}{' + uncommitted changes' if dirty.strip() else ''} ({root})"


def provenance() -> str:
    """When, where and which napari_crossd ran: a line for a results file."""
    return (f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.platform()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; napari_crossd {engine_version()}.")


def slice_sets(strokes: np.ndarray) -> dict[str, np.ndarray]:
    """Unpainted slices of axis 0: ``near`` (between the first and last painted), ``far``, ``all``."""
    painted = np.flatnonzero((strokes > 0).any(axis=(1, 2)))
    z = np.arange(strokes.shape[0])
    unpainted = ~np.isin(z, painted)
    inside = (z > painted.min()) & (z < painted.max())
    return {"near": z[unpainted & inside], "far": z[unpainted & ~inside], "all": z[unpainted]}


def scores(prediction: np.ndarray, truth: np.ndarray, slices: np.ndarray, classes) -> dict:
    """Dice per class (and their mean) over ``slices``, where ``truth`` is defined (> 0)."""
    p, t = prediction[slices], truth[slices]
    per_class = dice_scores(p[t > 0], t[t > 0], classes)
    values = [v for v in per_class.values() if not np.isnan(v)]
    return {"mean": float(np.mean(values)) if values else float("nan"), "classes": per_class}


def timed(call, *args):
    """``call(*args)``, its wall time and its process CPU time (a shared CPU makes wall times
    long; CPU time / 2 estimates the wall time on 2 cores of one's own)."""
    start, cpu = time.perf_counter(), time.process_time()
    result = call(*args)
    return result, time.perf_counter() - start, time.process_time() - cpu


def run_one(task: str, arm_name: str, seed: int, sample) -> dict:
    truth, image, spacing = sample.labels, sample.image, sample.spacing
    classes = list(range(1, len(sample.class_names) + 1))
    strokes = paint_strokes(truth, seed=seed, **STROKES)
    arm = make_arm(arm_name, sample.class_names, seed)

    _, fit_s, fit_cpu = timed(arm.fit, image, strokes, spacing)
    first, predict_s, predict_cpu = timed(arm.predict, image, spacing)
    sets = slice_sets(strokes)
    round1 = {name: scores(first, truth, zs, classes) for name, zs in sets.items()}

    corrections = paint_corrections(truth, first, strokes, seed=seed, **CORRECTIONS)
    both = np.where(corrections > 0, corrections, strokes)
    _, refit_s, refit_cpu = timed(arm.refit, image, both, spacing)
    second, repredict_s, _ = timed(arm.predict, image, spacing)
    kept = slice_sets(both)["all"]  # the corrected slices are painted now: not scored
    before, after = scores(first, truth, kept, classes), scores(second, truth, kept, classes)
    credit = getattr(arm, "credit_s", 0.0)
    return {
        "task": task, "arm": arm_name, "seed": seed, "class_names": list(sample.class_names),
        "shape": list(image.shape), "spacing": list(spacing),
        "painted_slices": np.flatnonzero((strokes > 0).any(axis=(1, 2))).tolist(),
        "corrected_slices": sorted(set(np.flatnonzero((corrections > 0).any(axis=(1, 2))).tolist())),
        "stroke_voxels": int((strokes > 0).sum()), "corrective_voxels": int((corrections > 0).sum()),
        "slices": {name: len(zs) for name, zs in sets.items()},
        "round1": round1, "round2": {"before": before, "after": after, "gain": after["mean"] - before["mean"]},
        "seconds": {"fit": fit_s + credit, "predict": predict_s, "train_to_labels": fit_s + credit + predict_s,
                    "refit": refit_s, "refit_to_labels": refit_s + repredict_s, "credited_features": credit,
                    "cpu_train_to_labels": fit_cpu + predict_cpu + getattr(arm, "credit_cpu_s", 0.0),
                    "cpu_refit": refit_cpu},
        "info": arm.info(),
        "machine": {"platform": platform.platform(), "processor": platform.machine(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "engine": engine_version()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "protocol": {"strokes": STROKES, "corrections": CORRECTIONS},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=list(ALL_ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="48 x 96 x 96 crops, results under results/quick/")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the forests use n_jobs=2)")
    parser.add_argument("--redo", action="store_true", help="rerun even where a result exists")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--out", type=Path, help="results folder (default: results/, --quick: results/quick/)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or HERE / "results" / ("quick" if args.quick else "")
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    # Seeds outermost: an interrupted run has every task and arm on the first seeds.
    for seed in [] if args.report_only else args.seeds:
        for task in args.tasks:
            sample = None
            for arm in args.arms:
                path = raw / f"{task}__{arm}__seed{seed}.json"
                if path.exists() and not args.redo:
                    continue
                sample = sample or (quick(TASKS[task].load()) if args.quick else TASKS[task].load())
                result = run_one(task, arm, seed, sample)
                path.write_text(json.dumps(result, indent=1))
                r1, s = result["round1"], result["seconds"]
                print(f"{task:17s} {arm:15s} seed {seed}: near {r1['near']['mean']:.3f} far {r1['far']['mean']:.3f}"
                      f" all {r1['all']['mean']:.3f}  train->labels {s['train_to_labels']:.1f} s (cpu"
                      f" {s['cpu_train_to_labels']:.0f})  gain {result['round2']['gain']:+.3f}  refit"
                      f" {s['refit']:.1f} s", flush=True)
    write_report(raw, out / "README.md", TASKS, quick=args.quick)


if __name__ == "__main__":
    main()
