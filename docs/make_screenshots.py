"""Screenshots of each napari-crossd widget in use, and the GUI responsiveness measurement.

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/make_screenshots.py [--region slab]
        [--stall-stacks stalls.txt]   # also: what the GUI thread was doing in each job's stalls

Drives a real napari window through the workflow of ``crossd demo`` on the MNI152 sample
(the "slab" region by default: 48 x 200 x 160 voxels at 1 mm): load the default
MobileNetV2 weights and inflate them, extract features, paint strokes, fine-tune, predict,
inspect. After each step it saves a window screenshot to docs/ (model.png, also the first
impression of ``crossd demo``: docks tabbed; run.png, finetune.png, inspector.png: one filter,
its rotation and phase, a feature map; inspector_rotations.png: a dynamic layer's learned
rotation per slice, in 3D). A 10 ms QTimer heartbeat runs the whole time; the longest gap
between beats while a job ran (the event loop's worst stall) is written to
benchmarks/results/gui_stall.md, with the machine's load average before and after (other
processes on the same cores make the stalls longer).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from napari_crossd._widgets._common import set_visible

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RESULTS = ROOT / "benchmarks" / "results"
REFERENCE_SLICES = 5
# What the stack sampler (--stall-stacks) found; the numbers are from a quiet 2-core machine.
NOTES = [
    "Notes (what the GUI thread does in the stalls, from `--stall-stacks`):",
    "",
    "* A job's row ends with the beat after its result was shown, so the turn that adds or updates its "
    "layers is the job's (before 2026-12-02 the script stopped counting when the job ended: the stall of "
    "showing the result went to the next row, or to none when a screenshot followed).",
    "* Each new napari layer: its Qt layer controls, its vispy visuals (a labels layer also builds its "
    "brush and polygon overlays) and its layer-list row, and in the same turn of the event loop (Qt "
    "paints before it runs timers) its first paint, where llvmpipe compiles the visual's shaders; a "
    "first colour bar also renders its glyphs. The last three reference rows are napari doing only that, "
    "no plugin code: 200-770 ms a layer on this machine, more the more layers the viewer holds, which "
    "is above the 100 ms goal before any plugin code runs. Features and predict add one layer each; the "
    "Inspector's first 'Show kernels' adds up to eight (overview, outline, filter and its colour bar, "
    "rotation, phase and its colour bar, amplitude), one per turn; a first grey overview, a first "
    "feature map or the Vectors of the learned rotations add one more. Later picks, slider moves and a "
    "second Predict update the layers in place (about a slice change's repaint), and no layer is "
    "removed (napari runs a full `gc.collect()` for each, about 300 ms with a model in memory).",
    "* Every repaint of the window under software OpenGL (llvmpipe): 60-100 ms a frame at this size, "
    "see the no-job reference row; it is the floor under every job's number.",
    "* Not the jobs themselves: the workers spend their time in torch and scikit-learn calls that "
    "release the GIL, and their torch threads leave the GUI a core. Progress shows in each widget's "
    "own bar: napari's activity dialog ran an animated GIF whose frames repainted the window about 20 "
    "times a second (and kept running after the bar closed); under llvmpipe on a shared core that took "
    "70% of the event loop's time (a beat every 40 ms instead of 12 ms, see the heartbeats) and made "
    "features and training about 1.5x slower.",
    "* The whole session's worst stall includes the reference rows and the script's own work between "
    "jobs, e.g. switching the view to 3D (every layer sliced again, volume visuals) for the last screenshot.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--region", default="slab", choices=("full", "slab", "small"))
    parser.add_argument("--no-stall-report", action="store_true", help="do not write benchmarks/results/gui_stall.md")
    parser.add_argument("--stall-stacks", metavar="FILE",
                        help="also sample the GUI thread's stack during stalls over 50 ms and write, per job, "
                             "the functions it was in (for finding what stalls; adds a little load)")
    args = parser.parse_args()

    import imageio.v3 as iio
    from napari.qt import get_qapp
    from qtpy.QtCore import QTimer

    from napari_crossd._widgets._stall import StallMeter, StallSampler
    from napari_crossd._widgets.inspector import ROLE
    from napari_crossd.datasets import MNI_CLASSES
    from napari_crossd.demo import open_viewer
    from napari_crossd.evaluation import paint_strokes

    load_before = os.getloadavg()
    app = get_qapp()
    meter = StallMeter(10)
    jobs: list[tuple[str, float, float, int]] = []  # (job, seconds, worst stall ms, heartbeats)
    sampler = StallSampler(meter) if args.stall_stacks else None
    stack_reports: list[str] = []

    def settle(seconds: float = 0.3) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            app.processEvents()
            time.sleep(0.01)

    def wait(widget, name: str) -> None:
        start, before = time.perf_counter(), len(meter.gaps_ms)
        while widget.runner.busy:
            app.processEvents()
            time.sleep(0.005)
        # The result was shown in the last turn; the beat after it closes that stall, which is this job's.
        shown = len(meter.gaps_ms)
        while len(meter.gaps_ms) == shown:
            app.processEvents()
            time.sleep(0.001)
        if widget.runner.last_status != "done":
            raise RuntimeError(f"{name}: {widget.runner.last_status}: {widget.runner.last_error}")
        record(name, start, before)

    def record(name: str, start: float, before: int) -> None:
        gaps = meter.gaps_ms[before:]
        if sampler is not None:
            stack_reports.append(sampler.report(name, before, len(meter.gaps_ms)))
        jobs.append((name, time.perf_counter() - start, max(gaps, default=0.0), len(gaps)))
        print(f"{name}: {jobs[-1][1]:.1f} s, worst stall {jobs[-1][2]:.0f} ms over {len(gaps)} beats", flush=True)

    viewer, widgets = open_viewer(region=args.region, load=False)
    viewer.window._qt_window.resize(1600, 1000)
    settle(2.0)  # the window's first paint (software OpenGL) is not a job's doing
    meter.start()
    if sampler is not None:
        sampler.start()

    def tab(widget) -> None:  # bring a widget's dock tab to the front (the demo tabs them)
        from qtpy.QtWidgets import QDockWidget

        native = getattr(widget, "native", widget)
        while native is not None and not isinstance(native, QDockWidget):
            native = native.parent()
        native.raise_()
        settle()

    def show_only(*prefixes: str, roles=()) -> None:
        for layer in viewer.layers:
            set_visible(layer, layer.name.startswith(prefixes) or layer.metadata.get(ROLE) in roles)

    def shot(name: str) -> None:
        settle(0.5)
        image = viewer.screenshot(canvas_only=False, flash=False)
        iio.imwrite(DOCS / f"{name}.png", np.asarray(image)[..., :3])
        print(f"wrote docs/{name}.png {np.asarray(image).shape}", flush=True)
        settle(0.1)  # a beat after the shot (its stall is not the next job's)

    model, run, tune, inspector = (widgets[k] for k in ("Model", "Run", "Fine-tune", "Inspector"))
    model.load()
    wait(model, "load and inflate the default weights")
    tab(model)
    shot("model")  # also the first impression of `crossd demo`: tabbed docks, the whole volume

    # The floor under every job's number: napari redrawing the window for a new slice, no job running.
    start, before, middle = time.perf_counter(), len(meter.gaps_ms), viewer.dims.current_step[0]
    for z in (*range(middle + 1, middle + 1 + REFERENCE_SLICES), middle):  # back where the shots expect it
        viewer.dims.set_current_step(0, z)
        settle()
    record(f"no job, for reference: {REFERENCE_SLICES} slice changes (napari's repaints)", start, before)

    image = viewer.layers["MNI152 T1"]
    run.image.value = image
    run.run()
    wait(run, f"features of {image.data.shape}")
    tab(run)
    show_only("MNI152 T1")
    viewer.layers[f"{image.name} features (PCA)"].opacity = 0.7
    viewer.reset_view()
    shot("run")

    truth = np.asarray(viewer.layers["MNI152 tissue"].data)
    tune.image.value = image
    strokes = tune.new_strokes()
    painted = paint_strokes(truth, slices=5, seed=0)
    for cls in range(1, len(MNI_CLASSES) + 1):
        strokes.data_setitem(tuple(np.nonzero(painted == cls)), cls)
    strokes.metadata["class_names"] = list(MNI_CLASSES)
    settle()  # a beat after painting the strokes by script (not the job's stall)
    tune.train()
    wait(tune, "train the forest on the strokes")
    tune.predict()
    wait(tune, "predict")
    tune.predict()
    wait(tune, "predict again (updates the segmentation layer)")
    show_only("MNI152 T1 segmentation", "MNI152 T1 strokes", "MNI152 T1")
    viewer.layers[f"{image.name} features (PCA)"].visible = False
    viewer.layers[f"{image.name} segmentation"].opacity = 0.45
    z = int(np.nonzero(painted.any(axis=(1, 2)))[0][2])
    viewer.dims.set_current_step(0, z)
    tab(tune)
    shot("finetune")

    inspect_shots(viewer, inspector, image, wait, tab, show_only, shot)

    # The floor under a job whose result is a new layer: napari's own work, no plugin code involved
    # (last, so the jobs above pay napari's first-time costs as a user would).
    def reference(name: str, step) -> None:
        start, before = time.perf_counter(), len(meter.gaps_ms)
        QTimer.singleShot(0, step)
        settle(0.5)
        record(f"no job, for reference: napari {name}", start, before)

    zeros = np.zeros(image.data.shape, np.float32)
    reference("adds a labels layer", lambda: viewer.add_labels(zeros.astype(np.uint8), name="reference labels"))
    reference("adds an image layer", lambda: viewer.add_image(zeros, name="reference image", colormap="twilight"))
    colorbar = viewer.layers["reference image"].colorbar
    reference("shows that layer's colour bar", lambda: setattr(colorbar, "visible", True))
    meter.stop()
    if sampler is not None:
        sampler.stop()
        stack_reports.append(sampler.report("whole session", 0, len(meter.gaps_ms)))
        Path(args.stall_stacks).write_text("\n\n".join(stack_reports) + "\n")
        print(f"wrote {args.stall_stacks}")

    if not args.no_stall_report:
        write_stall_report(jobs, image.data.shape, meter, load_before, os.getloadavg())
    viewer.close()


def inspect_shots(viewer, inspector, image, wait, tab, show_only, shot) -> None:
    """inspector.png (one filter: its slices, rotation, phase; a feature map over the T1) and
    inspector_rotations.png (a dynamic layer's learned rotation per slice, in 3D)."""
    inspector.image.value = image
    tab(inspector)
    inspector.layer.value = inspector.layer.choices[0]
    inspector.show_button.changed.emit(True)
    wait(inspector.kernel_jobs, "inspector kernels")
    inspector.output.value = int(inspector.view.order[0])  # the largest filter
    inspector.angle.value = 45.0
    # The kernels (and their rotation by 45 degrees) come from the inspector's own LatestJob
    # queue, not its feature runner: wait for it too, or the shot may show stale kernels.
    wait(inspector.kernel_jobs, "inspector filter and rotation")
    inspector.show_features()
    wait(inspector, "inspector feature maps")
    inspector.channel.value = 3
    roles = ("overview", "outline", "filter", "rotation", "phase", "amplitude", "feature map")
    show_only("MNI152 T1", roles=roles)
    for layer in viewer.layers:
        if layer.name.startswith("MNI152 T1 "):
            set_visible(layer, False)
    viewer.reset_view()
    shot("inspector")

    inspector.layer.value = "features.2.conv.1.0"
    wait(inspector.kernel_jobs, "inspector kernels of a dynamic layer")
    inspector.slice_rotations()
    wait(inspector, "inspector learned rotation per slice")
    for layer in viewer.layers:
        set_visible(layer, layer.name == "MNI152 T1" or layer.metadata.get("crossd_inspector") == "axes")
    viewer.layers["MNI152 T1"].opacity = 0.35
    viewer.dims.ndisplay = 3
    viewer.reset_view()
    viewer.camera.angles = (-20.0, 30.0, 150.0)  # obliquely from above: the stack of per-slice arrows
    viewer.camera.center = tuple(np.asarray(image.extent.world).mean(axis=0))  # the volume, not every layer
    viewer.camera.zoom *= 2.2
    shot("inspector_rotations")
    viewer.dims.ndisplay = 2
    viewer.layers["MNI152 T1"].opacity = 1.0


def write_stall_report(jobs, shape, meter, load_before, load_after) -> None:
    from napari_crossd._widgets._jobs import worker_threads

    RESULTS.mkdir(parents=True, exist_ok=True)
    threads = worker_threads()
    lines = [
        "# GUI responsiveness: the event loop's longest stall while jobs run",
        "",
        "Measured by `docs/make_screenshots.py` (a real napari window under Xvfb, 1600 x 1000): a 10 ms",
        "QTimer heartbeat on the GUI thread; a stall is the time between two beats minus 10 ms, i.e. how",
        "long napari could not repaint or react. Jobs run in napari `thread_worker`s.",
        "",
        f"Volume: MNI152 T1 {tuple(shape)} voxels (Z, Y, X), 1 mm; model: the default Cross-D MobileNetV2.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"CPU only; torch threads inside workers: {threads or 'torch default'} "
        "(`napari_crossd._widgets._jobs.worker_threads`).",
        f"Load average (1, 5, 15 min) before: {load_before[0]:.2f}, {load_before[1]:.2f}, {load_before[2]:.2f}; "
        f"after: {load_after[0]:.2f}, {load_after[1]:.2f}, {load_after[2]:.2f} "
        "(above ~0.5 before the run, other processes shared the cores).",
        "",
        "| job | seconds | worst stall (ms) | heartbeats |",
        "|---|---:|---:|---:|",
    ]
    for name, seconds, worst, beats in jobs:
        lines.append(f"| {name} | {seconds:.1f} | {worst:.0f} | {beats} |")
    lines += ["", f"Whole session: worst stall {meter.worst_ms:.0f} ms, 99th percentile "
              f"{meter.percentile_ms(99):.0f} ms over {len(meter.gaps_ms)} beats (includes adding layers, "
              "switching tabs and screenshots on the GUI thread).", "",
              *NOTES, ""]
    (RESULTS / "gui_stall.md").write_text("\n".join(lines))
    print(f"wrote {RESULTS / 'gui_stall.md'}")


if __name__ == "__main__":
    main()
