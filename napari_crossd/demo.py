"""``crossd demo``: the plugin's workflow on the MNI152 sample, with a window or without one.

    crossd demo                          # napari with the sample, the default weights and the widgets
    crossd demo --headless --out DIR     # the same pipeline without a display; outputs in DIR

The pipeline (the engine functions the widgets run): the MNI152 T1 sample and its tissue
labels; the default 2D weights (napari-crossd's Cross-D MobileNetV2) inflated to 3D;
features and their PCA colour view; simulated strokes (a few short scribbles per tissue
class on five axial slices, :func:`napari_crossd.evaluation.paint_strokes`); fine-tuning a
segmentation head on them; segmentation, scored with Dice against the tissue labels.

Headless outputs in DIR: ``features_pca.npy`` ((Z, Y, X, 3) float16 PCA colours),
``features.npy`` ((C, Z, Y, X) float16 feature stack), ``segmentation.nii.gz`` (on the
MNI152 file's grid, readable by any NIfTI viewer), ``strokes.nii.gz``, ``segmenter/``
(the trained model), ``screenshot.png`` and ``summary.json`` (Dice, timings, shapes).
The screenshot is napari's own rendering when a display is available (e.g. under
``xvfb-run``); without one it is composed from the same layers with numpy (the summary
says which).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from ._sample_data import mni152
from ._writer import write_labels
from .datasets import MNI_CLASSES
from .engine import (
    Progress,
    Segmenter,
    features_job,
    finetune_job,
    pca_rgb,
    prepare_model,
    run_job,
    save_segmenter,
    segment_job,
)
from .evaluation import dice_scores, paint_strokes
from .io.grids import crop_grid
from .io.samples import mni152_path

__all__ = ["REGIONS", "compose_screenshot", "main", "run_pipeline", "sample_region"]

# (Z, Y, X) slices of the canonical MNI152 volume (189 x 233 x 197). "slab": 48 axial slices
# through the ventricles and basal ganglia, the whole brain in-plane at 1 mm (1.2 M voxels).
REGIONS = {
    "full": (slice(None), slice(None), slice(None)),
    "slab": (slice(64, 112), slice(16, 216), slice(20, 180)),
    "small": (slice(60, 92), slice(20, 84), slice(66, 130)),
}
DOCK_MAX_WIDTH = 460  # px: at 1600 x 1000 the canvas keeps about 850 px
CLASS_COLOURS = np.array(
    [[0, 0, 0], [60, 60, 200], [230, 160, 40], [220, 60, 60], [240, 240, 240]], dtype=np.uint8
)


def sample_region(region: str = "slab") -> dict:
    """The MNI152 sample (reader conventions) cut to ``region``, with metadata for that grid."""
    if region not in REGIONS:
        raise ValueError(f"region must be one of {', '.join(REGIONS)}; got {region!r}")
    (t1, kwargs, _), (labels, _, _) = mni152()
    zyx = REGIONS[region]
    grid = crop_grid({k: kwargs[k] for k in ("scale", "translate", "metadata")}, zyx)
    image, truth = (np.ascontiguousarray(volume[zyx]) for volume in (t1, labels))
    return {"image": image, "truth": truth, "meta": grid, "region": region}


def _colour_labels(labels: np.ndarray) -> np.ndarray:
    return CLASS_COLOURS[np.clip(labels, 0, len(CLASS_COLOURS) - 1)]


def compose_screenshot(image: np.ndarray, rgb: np.ndarray, segmentation: np.ndarray, strokes: np.ndarray,
                       z: int | None = None) -> np.ndarray:
    """One axial slice side by side: T1 with strokes | feature PCA | segmentation over T1. (H, W, 3) uint8."""
    z = image.shape[0] // 2 if z is None else z
    grey = image[z].astype(np.float32)
    grey = (255 * (grey - grey.min()) / max(float(np.ptp(grey)), 1e-6)).astype(np.uint8)
    grey = np.repeat(grey[..., None], 3, axis=-1)
    painted = grey.copy()
    mask = strokes[z] > 0
    painted[mask] = _colour_labels(strokes[z])[mask]
    features = (255 * np.clip(rgb[z], 0, 1)).astype(np.uint8)
    overlay = (0.5 * grey + 0.5 * _colour_labels(segmentation[z])).astype(np.uint8)
    gap = np.full((grey.shape[0], 4, 3), 255, dtype=np.uint8)
    panel = np.concatenate([painted, gap, features, gap, overlay], axis=1)
    return panel[::-1]  # anterior up, as radiologists look at axial slices


def _have_display() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _napari_screenshot(sample: dict, rgb, segmentation, strokes, path: Path) -> bool:
    """napari's rendering of the result layers with the plugin's widgets docked; False without a display."""
    if not _have_display():
        return False
    try:
        import napari  # here, in the try: without a Qt binding the panel is composed instead

        # Shown (off screen under Xvfb): a hidden viewer renders a black canvas.
        viewer = napari.Viewer(show=True, title="napari-crossd demo")
        try:
            kwargs = {k: sample["meta"][k] for k in ("scale", "translate")}
            viewer.add_image(sample["image"], name="MNI152 T1", colormap="gray", **kwargs)
            viewer.add_image(rgb, rgb=True, name="features (PCA)", opacity=0.6, visible=False, **kwargs)
            viewer.add_labels(segmentation, name="segmentation", opacity=0.4, **kwargs)
            viewer.add_labels(strokes, name="strokes", **kwargs)
            viewer.dims.set_current_step(0, sample["image"].shape[0] // 2)
            viewer.reset_view()
            image = viewer.screenshot(canvas_only=True, flash=False)
            if image is None or float(np.asarray(image)[..., :3].mean()) < 1.0:
                return False  # nothing rendered (no OpenGL): compose one instead
            iio.imwrite(path, np.asarray(image))
            return True
        finally:
            viewer.close()
    except Exception as err:  # no OpenGL, no Qt binding: fall back to the composed panel
        print(f"  napari screenshot unavailable ({type(err).__name__}: {err}); composing one", flush=True)
        return False


@dataclass
class _Stopwatch:
    """Seconds of each pipeline step, in the order the steps ran."""

    seconds: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self.seconds[step] = round(now - self.started, 2)
        self.started = now


def _progress_printer(log: Callable[[str], None]) -> Callable[[Progress], None]:
    """A job's progress as log lines: each phase's first and last step, and every 20th."""

    def report(progress: Progress) -> None:
        total = f"/{progress.total}" if progress.total else ""
        loss = f" loss {progress.loss:.4f}" if progress.loss is not None else ""
        if progress.total is None or progress.step in (0, progress.total) or progress.step % 20 == 0:
            log(f"  {progress.step}{total} {progress.message}{loss}")

    return report


def _features(model3d, sample: dict, device: str, out: Path, report) -> tuple[np.ndarray, np.ndarray]:
    """The sample's feature stack and its PCA colours, both saved to ``out`` in float16."""
    spacing = sample["meta"]["scale"]
    features = np.asarray(run_job(features_job(model3d, sample["image"], spacing=spacing, device=device), report))
    rgb = np.asarray(pca_rgb(features))
    np.save(out / "features.npy", features.astype(np.float16))
    np.save(out / "features_pca.npy", rgb.astype(np.float16))
    return features, rgb


def _train(model3d, sample: dict, device: str, seed: int, out: Path, report, log) -> tuple:
    """Simulated strokes (saved to ``out``) and a segmenter trained on them.

    Returns:
        (segmenter, strokes, training summary, feature cache for segmenting the same volume).
    """
    image, meta, spacing = sample["image"], sample["meta"], sample["meta"]["scale"]
    strokes = paint_strokes(sample["truth"], slices=5, seed=seed)
    write_labels(str(out / "strokes.nii.gz"), strokes, meta)
    log(f"training on {int((strokes > 0).sum())} painted voxels")
    segmenter = Segmenter(model3d, list(MNI_CLASSES))
    cache = segmenter.features(image, spacing=spacing)  # computed once, read by training and segmentation
    history = run_job(finetune_job(segmenter, image, strokes, features=cache, spacing=spacing, device=device,
                                   seed=seed), report)
    return segmenter, strokes, history, cache


def _segment(segmenter, sample: dict, cache, device: str, out: Path, report) -> tuple[np.ndarray, Path, list]:
    """The sample's segmentation written on the MNI152 grid, and the segmenter saved beside it.

    Returns:
        (labels, segmentation path, segmenter files).
    """
    meta = sample["meta"]
    labels, _probabilities = run_job(segment_job(segmenter, sample["image"], features=cache, spacing=meta["scale"],
                                                 device=device, probabilities=False), report)
    labels = np.asarray(labels)
    [segmentation_path] = write_labels(str(out / "segmentation.nii.gz"), labels, meta)
    return labels, Path(segmentation_path), save_segmenter(segmenter, out / "segmenter")


def _screenshot(sample: dict, rgb: np.ndarray, labels: np.ndarray, strokes: np.ndarray, path: Path) -> str:
    """Write napari's rendering to ``path``, or the numpy composition without a display; which one."""
    if _napari_screenshot(sample, rgb, labels, strokes, path):
        return "napari canvas"
    iio.imwrite(path, compose_screenshot(sample["image"], rgb, labels, strokes))
    return "composed with numpy (no display): T1 + strokes | feature PCA | segmentation"


def run_pipeline(
    out: str | os.PathLike,
    *,
    region: str = "slab",
    strategy: str = "i3d",
    device: str = "auto",
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the demo pipeline headless and write its outputs to ``out`` (see the module docstring).

    Returns:
        The summary written to ``summary.json``: shapes, Dice per class, timings.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    watch, report = _Stopwatch(), _progress_printer(log)
    log(f"MNI152 sample, region {region!r}")
    sample = sample_region(region)
    watch.lap("load_sample")
    log("default weights -> 3D")
    model3d = prepare_model("default", strategy=strategy)
    watch.lap("load_model")
    log(f"features of {sample['image'].shape}")
    features, rgb = _features(model3d, sample, device, out, report)
    watch.lap("features")
    segmenter, strokes, history, cache = _train(model3d, sample, device, seed, out, report, log)
    watch.lap("finetune")
    log("segmenting")
    labels, segmentation_path, saved = _segment(segmenter, sample, cache, device, out, report)
    watch.lap("segment")
    scores = dice_scores(labels, sample["truth"], range(1, len(MNI_CLASSES) + 1))
    dice = {name: round(scores[index], 4) for index, name in enumerate(MNI_CLASSES, start=1)}
    kind = _screenshot(sample, rgb, labels, strokes, out / "screenshot.png")
    watch.lap("screenshot")
    summary = {
        "region": region,
        "shape": list(sample["image"].shape),
        "spacing": list(sample["meta"]["scale"]),
        "strategy": strategy,
        "features": list(features.shape),
        "painted_voxels": int((strokes > 0).sum()),
        "finetune": {k: v for k, v in (history or {}).items() if isinstance(v, (int, float, str, list, bool))},
        "segmenter": segmenter.describe(),  # the features, and whether auto-context was kept
        "dice": dice,
        "mean_dice": round(float(np.mean(list(dice.values()))), 4),
        "screenshot": kind,
        "outputs": sorted([p.name for p in out.iterdir()] + ["summary.json"]),
        "segmentation": str(segmentation_path),
        "segmenter_files": [str(p) for p in saved],
        "seconds": watch.seconds,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    log(f"Dice: {dice}; outputs in {out}")
    return summary


def open_viewer(region: str = "full", strategy: str = "i3d", viewer=None, load: bool = True):
    """napari with the sample volume (and its tissue labels), the four widgets docked as tabs, the
    default weights loading in the Model widget (a worker: the window shows at once; ``load=False``
    leaves the Load button to the caller).

    Returns:
        (viewer, widgets by first word of their name: Model, Run, Fine-tune, Inspector);
        call ``napari.run()`` to hand the window to the user.
    """
    import napari  # only with a window: the headless demo runs where no Qt binding is installed

    viewer = viewer if viewer is not None else napari.Viewer(title="napari-crossd")
    if region == "full":
        viewer.open_sample("napari-crossd", "mni152")
    else:
        sample = sample_region(region)
        kwargs = {k: sample["meta"][k] for k in ("scale", "translate")}
        viewer.add_image(sample["image"], name="MNI152 T1", colormap="gray", metadata=sample["meta"]["metadata"],
                         **kwargs)
        viewer.add_labels(sample["truth"], name="MNI152 tissue", visible=False,
                          metadata=sample["meta"]["metadata"], **kwargs)
    viewer.layers["MNI152 tissue"].visible = False
    viewer.layers.selection.active = viewer.layers["MNI152 T1"]
    widgets, docks = {}, []
    for name in ("Model (load and inflate weights)", "Run (features, segmentation)",
                 "Fine-tune (paint and train)", "Inspector (kernels, rotations, phase)"):
        # tabbed, one beside the other: stacked, four docks left the canvas a strip of 240 px
        dock, widgets[name.split(" ")[0]] = viewer.window.add_plugin_dock_widget("napari-crossd", name, tabify=True)
        docks.append(dock)
    for dock in docks:  # a dock grows with its widgets' text; the canvas keeps most of the window
        dock.setMaximumWidth(DOCK_MAX_WIDTH)
    docks[0].raise_()  # the Model tab in front: loading weights is the first step
    model = widgets["Model"]
    model.strategy.value = strategy
    if load:
        model.load()
    return viewer, widgets


def main(args) -> int:
    """Entry point of ``crossd demo`` (``args`` from :mod:`napari_crossd.cli`)."""
    if args.headless and args.out is None:
        raise ValueError("--headless needs --out DIR for the outputs")
    try:
        mni152_path("t1")  # fail at once, before weights load or a window opens
    except ModuleNotFoundError as err:
        # The sample's files are what is missing: reported by the CLI as a file error, no traceback.
        raise FileNotFoundError(f"the demo needs the MNI152 sample. {err}") from None
    if args.headless:
        summary = run_pipeline(args.out, region=args.region or "slab", strategy=args.strategy,
                               device=args.device)
        print(json.dumps({"mean_dice": summary["mean_dice"], "seconds": summary["seconds"]}))
        return 0
    import napari  # only with a window: the headless demo runs where no Qt binding is installed

    open_viewer(region=args.region or "full", strategy=args.strategy)
    napari.run()
    return 0
