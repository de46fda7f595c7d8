"""``crossd demo``: the plugin's workflow on the MNI152 sample, with a window or without one.

    crossd demo                          # napari with the sample, the default weights and the widgets
    crossd demo --headless --out DIR     # the same pipeline without a display; outputs in DIR

The pipeline (the engine functions the widgets run): the MNI152 T1 sample and its tissue
labels; the default 2D weights (napari-crossd's Cross-D MobileNetV2) inflated to 3D;
features and their PCA colour view; simulated strokes (a few short scribbles per tissue
class on five axial slices, :func:`napari_crossd.datasets.paint_strokes`); fine-tuning a
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
from pathlib import Path

import numpy as np

__all__ = ["REGIONS", "compose_screenshot", "main", "run_pipeline", "sample_region"]

# (Z, Y, X) slices of the canonical MNI152 volume (189 x 233 x 197). "slab": 48 axial slices
# through the ventricles and basal ganglia, the whole brain in-plane at 1 mm (1.2 M voxels).
REGIONS = {
    "full": (slice(None), slice(None), slice(None)),
    "slab": (slice(64, 112), slice(16, 216), slice(20, 180)),
    "small": (slice(60, 92), slice(20, 84), slice(66, 130)),
}
CLASS_COLOURS = np.array(
    [[0, 0, 0], [60, 60, 200], [230, 160, 40], [220, 60, 60], [240, 240, 240]], dtype=np.uint8
)


def sample_region(region: str = "slab") -> dict:
    """The MNI152 sample (reader conventions) cut to ``region``, with metadata for that grid."""
    from ._sample_data import mni152

    if region not in REGIONS:
        raise ValueError(f"region must be one of {', '.join(REGIONS)}; got {region!r}")
    (t1, kwargs, _), (labels, _, _) = mni152()
    zyx = REGIONS[region]
    starts = np.array([s.start or 0 for s in zyx], dtype=float)
    nifti = dict(kwargs["metadata"]["nifti"])
    # The template is RAS already: voxel (x, y, z) of the cut = voxel + start of the whole.
    shift = np.eye(4)
    shift[:3, 3] = starts[::-1]
    for key in ("affine", "canonical_affine"):
        nifti[key] = np.asarray(nifti[key]) @ shift
    image = np.ascontiguousarray(t1[zyx])
    nifti["shape"] = tuple(int(n) for n in image.shape[::-1])
    scale = np.asarray(kwargs["scale"], dtype=float)
    translate = np.asarray(kwargs["translate"], dtype=float) + starts * scale
    meta = {"scale": tuple(scale), "translate": tuple(translate), "metadata": {"nifti": nifti}}
    return {"image": image, "truth": np.ascontiguousarray(labels[zyx]), "meta": meta, "region": region}


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
        import napari

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
            import imageio.v3 as iio

            iio.imwrite(path, np.asarray(image))
            return True
        finally:
            viewer.close()
    except Exception as err:  # no OpenGL, no Qt binding: fall back to the composed panel
        print(f"  napari screenshot unavailable ({type(err).__name__}: {err}); composing one", flush=True)
        return False


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
    import imageio.v3 as iio

    from ._writer import write_labels
    from .datasets import MNI_CLASSES, dice_scores, paint_strokes
    from .engine import (
        Segmenter,
        features_job,
        finetune_job,
        pca_rgb,
        prepare_model,
        run_job,
        save_segmenter,
        segment_job,
    )

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 2)
        clock = now

    def report(progress) -> None:
        total = f"/{progress.total}" if progress.total else ""
        loss = f" loss {progress.loss:.4f}" if progress.loss is not None else ""
        if progress.total is None or progress.step in (0, progress.total) or progress.step % 20 == 0:
            log(f"  {progress.step}{total} {progress.message}{loss}")

    log(f"MNI152 sample, region {region!r}")
    sample = sample_region(region)
    image, truth, meta = sample["image"], sample["truth"], sample["meta"]
    spacing = meta["scale"]
    lap("load_sample")
    log("default weights -> 3D")
    model3d = prepare_model("default", strategy=strategy)
    lap("load_model")
    log(f"features of {image.shape}")
    features = np.asarray(run_job(features_job(model3d, image, spacing=spacing, device=device), report))
    rgb = np.asarray(pca_rgb(features))
    np.save(out / "features.npy", features.astype(np.float16))
    np.save(out / "features_pca.npy", rgb.astype(np.float16))
    lap("features")
    strokes = paint_strokes(truth, slices=5, seed=seed)
    write_labels(str(out / "strokes.nii.gz"), strokes, meta)
    log(f"training on {int((strokes > 0).sum())} painted voxels")
    segmenter = Segmenter(model3d, list(MNI_CLASSES))
    cache = segmenter.features(image, spacing=spacing)  # computed once, read by training and segmentation
    history = run_job(finetune_job(segmenter, image, strokes, features=cache, spacing=spacing, device=device,
                                   seed=seed), report)
    lap("finetune")
    log("segmenting")
    labels, _probabilities = run_job(segment_job(segmenter, image, features=cache, spacing=spacing, device=device,
                                                 probabilities=False), report)
    labels = np.asarray(labels)
    [segmentation_path] = write_labels(str(out / "segmentation.nii.gz"), labels, meta)
    saved = save_segmenter(segmenter, out / "segmenter")
    lap("segment")
    scores = dice_scores(labels, truth, range(1, len(MNI_CLASSES) + 1))
    dice = {name: round(scores[index], 4) for index, name in enumerate(MNI_CLASSES, start=1)}
    screenshot = out / "screenshot.png"
    if _napari_screenshot(sample, rgb, labels, strokes, screenshot):
        kind = "napari canvas"
    else:
        iio.imwrite(screenshot, compose_screenshot(image, rgb, labels, strokes))
        kind = "composed with numpy (no display): T1 + strokes | feature PCA | segmentation"
    lap("screenshot")
    summary = {
        "region": region,
        "shape": list(image.shape),
        "spacing": list(spacing),
        "strategy": strategy,
        "features": list(features.shape),
        "painted_voxels": int((strokes > 0).sum()),
        "finetune": {k: v for k, v in (history or {}).items() if isinstance(v, (int, float, str, list, bool))},
        "dice": dice,
        "mean_dice": round(float(np.mean(list(dice.values()))), 4),
        "screenshot": kind,
        "outputs": sorted([p.name for p in out.iterdir()] + ["summary.json"]),
        "segmentation": str(segmentation_path),
        "segmenter_files": [str(p) for p in saved],
        "seconds": timings,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    log(f"Dice: {dice}; outputs in {out}")
    return summary


def open_viewer(region: str = "full", strategy: str = "i3d", viewer=None, load: bool = True):
    """napari with the sample volume (and its tissue labels), the four widgets docked, the
    default weights loading in the Model widget (a worker: the window shows at once; ``load=False``
    leaves the Load button to the caller).

    Returns:
        (viewer, widgets by first word of their name: Model, Run, Fine-tune, Inspector);
        call ``napari.run()`` to hand the window to the user.
    """
    import napari

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
    widgets = {}
    for name in ("Model (load and inflate weights)", "Run (features, segmentation)",
                 "Fine-tune (paint and train)", "Inspector (kernels, rotations, phase)"):
        _, widgets[name.split(" ")[0]] = viewer.window.add_plugin_dock_widget("napari-crossd", name)
    model = widgets["Model"]
    model.strategy.value = strategy
    if load:
        model.load()
    return viewer, widgets


def main(args) -> int:
    """Entry point of ``crossd demo`` (``args`` from :mod:`napari_crossd.cli`)."""
    from .datasets import mni152_path

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
    import napari

    open_viewer(region=args.region or "full", strategy=args.strategy)
    napari.run()
    return 0
