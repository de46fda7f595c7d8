"""Dice of segmentation from scribbles on the MNI152 T1: our fine-tuned head vs scikit-image + random forest.

    python benchmarks/finetune_mni.py [--steps 300] [--out benchmarks/results/finetune_mni_cpu.md]

Ground truth: background / other / grey matter / white matter from the template's tissue
maps (napari_crossd.datasets.load_mni152). Training labels: scribbles on 5 axial slices
(napari_crossd.datasets.paint_strokes, seeds 0..2). Dice per class is measured on every
axial slice without a scribble. Arms: the ImageNet MobileNetV2 inflated with each
strategy, the same network randomly initialised, our own Cross-D MobileNetV2 pretrained on
Fashion-MNIST (``load_model("default")``), and the classical napari baseline:
scikit-image ``multiscale_basic_features`` + a random forest (scikit-learn, benchmark only).
Times: "train -> prediction" is the wall time from the start of fine-tuning (the encoder's
features not yet computed) to the full-volume label map, on this machine's CPU threads.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from napari_crossd import build_model, inflate
from napari_crossd.datasets import load_mni152, paint_strokes
from napari_crossd.engine import Segmenter, finetune, prepare_model, segment

ARMS = ("centre", "i3d", "acs", "crossd", "random", "default")


def dice(prediction: np.ndarray, truth: np.ndarray, cls: int) -> float:
    a, b = prediction == cls, truth == cls
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def ours(arm: str, image, strokes, steps: int):
    if arm == "random":
        torch.manual_seed(0)
        model = inflate(build_model("mobilenet_v2")).eval()
    elif arm == "default":
        model = prepare_model("default")  # Cross-D layers use their learned 3D kernels
    else:
        model = prepare_model("imagenet", strategy=arm)
    segmenter = Segmenter(model, 4)
    torch.manual_seed(0)  # the head's dropout: runs repeat exactly
    start = time.perf_counter()
    summary = finetune(segmenter, image, strokes, steps=steps, device="cpu")
    labels, _ = segment(segmenter, image, device="cpu")
    return labels, time.perf_counter() - start, summary["depth"]


def forest(image, strokes):
    from skimage.feature import multiscale_basic_features
    from sklearn.ensemble import RandomForestClassifier

    start = time.perf_counter()
    features = multiscale_basic_features(image.astype(np.float32), channel_axis=None, sigma_min=1, sigma_max=16)
    annotated = strokes > 0
    classifier = RandomForestClassifier(n_estimators=50, n_jobs=-1, max_depth=10, max_samples=0.05, random_state=0)
    classifier.fit(features[annotated], strokes[annotated])
    labels = classifier.predict(features.reshape(-1, features.shape[-1])).reshape(image.shape).astype(np.uint8)
    return labels, time.perf_counter() - start, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--arms", nargs="+", default=[*ARMS, "forest"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "finetune_mni_cpu.md")
    args = parser.parse_args()

    sample = load_mni152()
    rows, depths = {}, {}
    for seed in range(args.seeds):
        strokes = paint_strokes(sample.labels, slices=5, strokes_per_class=3, seed=seed)
        test = np.ones(sample.labels.shape[0], dtype=bool)
        test[np.unique(np.nonzero(strokes)[0])] = False
        for arm in args.arms:
            if arm == "forest":
                labels, seconds, depth = forest(sample.image, strokes)
            else:
                labels, seconds, depth = ours(arm, sample.image, strokes, args.steps)
            scores = [dice(labels[test], sample.labels[test], c) for c in range(1, 5)]
            rows.setdefault(arm, []).append((*scores, seconds))
            depths.setdefault(arm, []).append(depth)
            report = " ".join(f"{s:.3f}" for s in scores)
            print(f"seed {seed} {arm:8s} {report}  {seconds:.1f} s  depth {depth}", flush=True)

    lines = [
        "# Segmentation from scribbles: MNI152 T1 (197 x 233 x 189, 1 mm)",
        "",
        f"`python benchmarks/finetune_mni.py --steps {args.steps} --seeds {args.seeds}` on "
        f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads.",
        "Training labels: 3 strokes per class on each of 5 axial slices (about 900 voxels), seeds 0.."
        f"{args.seeds - 1}; Dice on every other axial slice, mean +- std over seeds. Time: from the start of"
        " training (encoder features not cached) to the full-volume label map. Depth chosen: encoder levels in"
        " the hypercolumn picked by held-out loss, per seed (0 = the grey value alone).",
        "",
        "| arm | background | other (CSF) | grey matter | white matter | train -> prediction (s) | depth chosen |",
        "|---|---|---|---|---|---|---|",
    ]
    names = {
        "forest": "scikit-image features + random forest",
        "random": "random init (MobileNetV2)",
        "default": "our Cross-D MobileNetV2 (Fashion-MNIST; the default)",
    }
    for arm, values in rows.items():
        values = np.array(values)
        cells = [f"{m:.3f} +- {s:.3f}" for m, s in zip(values[:, :4].mean(0), values[:, :4].std(0), strict=True)]
        label = names.get(arm, f"ImageNet MobileNetV2, {arm}")
        chosen = "-" if arm == "forest" else ", ".join(str(d) for d in depths[arm])
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {values[:, 4].mean():.1f} | {chosen} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
