"""The strokes benchmark's table, written from the raw per-(task, arm, seed) results."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from arms import BASELINES, FILTERS, FOREST

NAMES = {
    "filters-forest": "(a) filter bank + forest (ilastik)",
    "slices-forest": "(b) 2D ImageNet MobileNetV2 per slice + forest (Convpaint)",
    "default": "(c) ours, default (widget)",
    "default-no-context": "ours, no auto-context, sqrt(channels) per split (the (c) before 2026-12-02)",
    "default-sqrt": "ours, default with sqrt(channels) per split (the (c) of 2026-12-02 12:40)",
    "context-no-levels": "ours, auto-context, sqrt(channels) per split, filter bank only (no encoder level)",
    "default-no-levels-0.3": "ours, default, filter bank only (no encoder level)",
    "default-full": "ours, no auto-context, full fine-tuning",
    "default-features-0.3": "ours, no auto-context, forest max_features 0.3",
    "default-unweighted": "ours, no auto-context, forest without class weights",
    "default-no-levels": "ours, no auto-context, filter bank only (no encoder level)",
    "default-weighted": "ours, default with class weights (the (c) of 2026-12-02 13:10)",
    "trees-64": "ours, default with class weights and 64 trees",
    "regate-context": "ours, default, auto-context decided again at the corrective round (screen)",
}
SETS = ("near", "far", "all")


def _pm(values, digits: int = 3) -> str:
    values = np.asarray(values, dtype=float)
    return f"{np.nanmean(values):.{digits}f} +- {np.nanstd(values):.{digits}f}"


def near_far_table(runs: dict[str, dict[str, list[dict]]], label: str, keys=("near", "far")) -> list[str]:
    """Markdown rows: near / far Dice (or other ``keys``; mean +- std over seeds) per task, and their means over tasks.

    ``runs``: ``{task: {row name: [{"near": ..., "far": ...} per seed]}}``, rows in the first task's order.
    """
    tasks = list(runs)
    lines = [f"| {label} | " + " | ".join(f"{t} {k}" for t in tasks for k in keys)
             + " | " + " | ".join(f"mean {k}" for k in keys) + " |",
             "|---" * ((len(tasks) + 1) * len(keys) + 1) + "|"]
    for row in runs[tasks[0]]:
        cells = [_pm([seed[k] for seed in runs[t][row]]) for t in tasks for k in keys]
        means = [np.mean([np.mean([seed[k] for seed in runs[t][row]]) for t in tasks]) for k in keys]
        lines.append(f"| {row} | " + " | ".join(cells) + " | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    return lines


def _order(arm: str) -> tuple:
    """Baselines first, then the default, then the other arms of ours."""
    return (arm not in BASELINES, arm != "default", arm)


def _name(arm: str) -> str:
    return NAMES.get(arm, f"(d) ours, {arm.replace('-', ' weights, ', 1)} (no auto-context)")


def load(raw: Path) -> dict:
    """{task: {arm: [result per seed]}}."""
    runs: dict = defaultdict(lambda: defaultdict(list))
    for path in sorted(raw.glob("*.json")):
        result = json.loads(path.read_text())
        runs[result["task"]][result["arm"]].append(result)
    return runs


def _mean(results, *keys) -> float:
    values = []
    for r in results:
        for key in keys:
            r = r[key]
        values.append(r)
    return float(np.nanmean(values))


def task_table(task: str, arms: dict) -> list[str]:
    first = next(iter(arms.values()))[0]
    names = first["class_names"]
    head = ["arm", "seeds", *(f"Dice {s}" for s in SETS), *(f"{c} (all)" for c in names),
            "Train -> labels (s)", "(CPU s)", "corrective gain", "retrain (s)", "retrain -> labels (s)"]
    lines = [f"### {task}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for arm in sorted(arms, key=_order):
        results = arms[arm]
        cells = [_name(arm), str(len(results))]
        cells += [_pm([r["round1"][s]["mean"] for r in results]) for s in SETS]
        cells += [_pm([r["round1"]["all"]["classes"][str(i + 1)] for r in results]) for i in range(len(names))]
        cells += [f"{_mean(results, 'seconds', 'train_to_labels'):.1f}",
                  f"{_mean(results, 'seconds', 'cpu_train_to_labels'):.0f}",
                  _pm([r["round2"]["gain"] for r in results]),
                  f"{_mean(results, 'seconds', 'refit'):.1f}", f"{_mean(results, 'seconds', 'refit_to_labels'):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    slices = first["slices"]
    lines += ["", f"{first['shape']} voxels, spacing {first['spacing']}; painted slices {first['painted_slices']}"
              f" (seed {first['seed']}; {first['stroke_voxels']} voxels); unpainted slices near / far: "
              f"{slices['near']} / {slices['far']}.", ""]
    return lines


def summary(runs: dict, tasks) -> list[str]:
    """Mean over the context tasks, and the targets the lead checks, from the numbers above."""
    context = [t for t in runs if t in tasks and tasks[t].context]
    arms = sorted({a for t in context for a in runs[t]}, key=_order)
    lines = ["## Mean over the context tasks", "", f"Tasks: {', '.join(context)}. Mean over classes, then seeds, "
             "then tasks (only arms run on all of them).", "", "| arm | " + " | ".join(f"Dice {s}" for s in SETS)
             + " | corrective gain |", "|---" * 5 + "|"]
    means, gains = {}, {}
    for arm in arms:
        if not all(arm in runs[t] for t in context):
            continue
        means[arm] = {s: np.mean([_mean(runs[t][arm], "round1", s, "mean") for t in context]) for s in SETS}
        gains[arm] = np.mean([_mean(runs[t][arm], "round2", "gain") for t in context])
        lines.append(f"| {_name(arm)} | " + " | ".join(f"{means[arm][s]:.3f}" for s in SETS)
                     + f" | {gains[arm]:+.3f} |")
    return [*lines, "", *targets(runs, means, gains)]


def targets(runs: dict, context_means: dict, context_gains: dict) -> list[str]:
    if "default" not in context_means:
        return []
    lines = ["## Targets", ""]
    for task, arms in runs.items():
        if "default" in arms and any(b in arms for b in BASELINES):
            ours = _mean(arms["default"], "round1", "all", "mean")
            best = max(_mean(arms[b], "round1", "all", "mean") for b in BASELINES if b in arms)
            verdict = "met" if ours >= best - 0.01 else "NOT met"
            lines.append(f"- {task}: (c) {ours:.3f} vs best baseline {best:.3f} (all unpainted): {verdict}")
    for s in ("near", "far") if any(b in context_means for b in BASELINES) else ():
        best = max(context_means[b][s] for b in BASELINES if b in context_means)
        margin = context_means["default"][s] - best
        lines.append(f"- context mean, {s}: (c) {margin * 100:+.1f} Dice points over the best baseline "
                     f"(target +3): {'met' if margin >= 0.03 else 'NOT met'}")
    if "filters-forest" in context_gains:
        ours, theirs = context_gains["default"], context_gains["filters-forest"]
        lines.append(f"- context mean, corrective gain: (c) {ours:+.3f}, forest's {theirs:+.3f}: "
                     f"{'met' if ours >= theirs else 'NOT met'}")
    for task, arms in runs.items():
        if "default" in arms:
            d = arms["default"]
            size = "x".join(str(n) for n in d[0]["shape"])
            lines.append(f"- {task} ({size}): Train -> labels {_mean(d, 'seconds', 'train_to_labels'):.1f} s wall, "
                         f"{_mean(d, 'seconds', 'cpu_train_to_labels'):.0f} CPU s (target <= 60 s on 2 cores for "
                         f"~200^3); {_corrective(d, arms.get('filters-forest'))}; retrain "
                         f"{_mean(d, 'seconds', 'refit'):.1f} s (<= 10 s)")
    return lines


def _corrective(ours: list[dict], forest: list[dict] | None) -> str:
    """The corrective gain of (c) against the forest's, with what each could gain at most
    (1 - Dice before: a gain is bounded by the error left) and the share of that it removed."""
    gain = _mean(ours, "round2", "gain")
    if not forest:
        return f"corrective gain {gain:+.3f}"
    theirs = _mean(forest, "round2", "gain")
    room, room_theirs = (1 - _mean(r, "round2", "before", "mean") for r in (ours, forest))
    after, after_theirs = (_mean(r, "round2", "after", "mean") for r in (ours, forest))
    share, share_theirs = (np.mean([r["round2"]["gain"] / (1 - r["round2"]["before"]["mean"]) for r in rs])
                           for rs in (ours, forest))
    verdict = "met" if gain >= theirs else "NOT met" + (
        f", and out of reach: (c) has {room:.3f} left to gain" if room < theirs else "")
    return (f"corrective gain {gain:+.3f}, forest's {theirs:+.3f} ({verdict}; Dice after it {after:.3f}, forest's "
            f"{after_theirs:.3f}; error removed {share:.0%} of {room:.3f}, forest's {share_theirs:.0%} of "
            f"{room_theirs:.3f})")


def write_report(raw: Path, out: Path, tasks, quick: bool = False) -> None:
    runs = load(raw)
    if not runs:
        return
    every = [r for arms in runs.values() for results in arms.values() for r in results]
    m = every[0]["machine"]
    engines = sorted({r["machine"].get("engine", "?") for r in every})
    dates = sorted(r["date"] for r in every)
    lines = [
        "# Strokes benchmark" + (" (quick crops: a smoke run, not results)" if quick else ""), "",
        "`python benchmarks/strokes/run.py` (protocol: its docstring). Written by the script from results/raw/"
        " (one JSON per task, arm and seed; dates and machines in each). Dice: mean over classes of each arm's"
        " per-class Dice, mean +- std over stroke seeds. near / far: unpainted slices between the first and last"
        " painted slice / beyond them; all: every unpainted slice. Corrective gain: Dice (all, mean over classes)"
        " after the second round minus before, on the slices unpainted in both rounds.", "",
        f"Machine: {m['platform']}, torch {m['torch']}, {m['torch_threads']} torch threads; runs {dates[0]} .. "
        f"{dates[-1]}; napari_crossd {'; '.join(engines)}. The 2 CPU cores were shared with other jobs: wall times"
        " are upper bounds; CPU s (process CPU time) / 2 estimates the wall time on 2 cores of one's own.",
        f"Forests: scikit-learn RandomForestClassifier({FOREST}), random_state ="
        f" seed; (a) skimage.feature.multiscale_basic_features({FILTERS}) on the whole volume (computed once per "
        "volume and credited to every first Train); (b) levels at strides 2, 4, 8, 16 (16 + 24 + 32 + 96 channels) "
        "bilinearly upsampled per slice, plus the grey value.", "",
        "## Tasks", "",
        "Labels are built from what installs offline by the loaders of napari_crossd.datasets (their docstrings"
        " say exactly how). *Context* tasks: grey values alone cannot separate the classes.", "",
        *(f"- {name}{' (context)' if t.context else ''}: {t.about}. `datasets.{t.load.__name__}()`; install:"
          f" `{t.install}`." for name, t in tasks.items() if name in runs),
        "", *summary(runs, tasks), "", "## Per task", "",
    ]
    for task in sorted(runs, key=list(tasks).index):
        lines += task_table(task, runs[task])
    previous = out.read_text() if out.exists() else ""
    reading = previous[previous.index("\n## Reading"):] if "\n## Reading" in previous else ""  # by hand: kept
    out.write_text("\n".join(lines) + "\n" + reading)
