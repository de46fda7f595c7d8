"""The dock widgets in a real napari viewer (run under Xvfb: xvfb-run -a python -m pytest tests/test_widgets.py).

One MNI152 crop (32 x 64 x 64 voxels, opened through the plugin's reader) goes through the
whole workflow: real ImageNet MobileNetV2 weights, inflation, features, painted strokes,
fine-tuning, prediction, saving and reloading; bad inputs and cancelling leave layers intact.
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import torch

pytest.importorskip("pytestqt")
napari = pytest.importorskip("napari")
if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or os.environ.get("QT_QPA_PLATFORM")):
    message = "the napari widget tests need a display: run them under xvfb-run -a (scripts/test.sh does)"
    if os.environ.get("CROSSD_REQUIRE_TEST_DATA"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=True)

from napari_crossd.evaluation import dice_scores, paint_strokes  # noqa: E402

PLUGIN = "napari-crossd"
WAIT_MS = 240_000
# Dice of each class after 40 steps on the crop's strokes (measured: 0.95, 0.49, 0.78, 0.78).
DICE_FLOORS = {1: 0.90, 2: 0.30, 3: 0.60, 4: 0.60}


def dock(viewer, name: str):
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    return widget


def wait_idle(qtbot, widget, timeout=WAIT_MS):
    qtbot.waitUntil(lambda: not widget.runner.busy, timeout=timeout)


def snapshot(viewer):
    return [(layer.name, type(layer).__name__, np.array(layer.data, copy=True)) for layer in viewer.layers]


def assert_unchanged(viewer, before):
    after = snapshot(viewer)
    assert [(n, t) for n, t, _ in after] == [(n, t) for n, t, _ in before]
    for (_, _, a), (_, _, b) in zip(after, before, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.fixture
def errors():
    from napari.utils.notifications import NotificationSeverity, notification_manager

    seen: list[str] = []

    def record(notification):
        if notification.severity == NotificationSeverity.ERROR:
            seen.append(str(notification.message))

    notification_manager.notification_ready.connect(record)
    yield seen
    notification_manager.notification_ready.disconnect(record)


@pytest.fixture
def viewer_with_crop(make_napari_viewer, mni_crop_files):
    viewer = make_napari_viewer()
    [image] = viewer.open(str(mni_crop_files["t1"]), plugin=PLUGIN)
    return viewer, image


def load_model_in_widget(qtbot, viewer, checkpoint=None, strategy="i3d"):
    """Load ``checkpoint`` (None: the bundled default) through the Model widget."""
    model_widget = dock(viewer, "Model (load and inflate weights)")
    if checkpoint is not None:
        model_widget.checkpoint.value = str(checkpoint)
    model_widget.strategy.value = strategy
    model_widget.load()
    wait_idle(qtbot, model_widget)
    assert model_widget.runner.last_status == "done", model_widget.runner.last_error
    return model_widget


def test_workflow_features_finetune_predict_save_reload(
    qtbot, viewer_with_crop, mni_crop_files, mobilenet_v2_imagenet_path, tmp_path, errors
):
    viewer, image = viewer_with_crop
    assert image.data.shape == (32, 64, 64)
    assert tuple(image.scale) == (1.0, 1.0, 1.0) and tuple(image.translate) == (-12.0, -114.0, -32.0)
    original = np.array(image.data, copy=True)

    # An official Cross-D ResNet-18 checkpoint with tensors that the official evaluation
    # drops: the status shows the loader's real key diff and names what it ignored.
    from official_crossd import official_checkpoint, official_crossd_resnet

    extras = {"layer1.0.dilated_conv.weight": torch.zeros(64, 64, 3, 3), "conv1.angle": torch.zeros(1)}
    official = tmp_path / "CrossDConvR18.pth"
    torch.save(official_checkpoint(official_crossd_resnet(num_classes=2).state_dict(), extras), official)
    model_widget = load_model_in_widget(qtbot, viewer, official)
    assert model_widget.session.info["format"] == "crossd_official"
    ignored = "(ignored: layer1.0.dilated_conv.weight, conv1.angle)"
    assert f"302 tensors loaded: 0 missing, 2 unexpected {ignored}" in model_widget.status.value

    # The real ImageNet MobileNetV2 (torchvision's file), chosen as a user would.
    model_widget.checkpoint.value = str(mobilenet_v2_imagenet_path)
    model_widget.load()
    wait_idle(qtbot, model_widget)
    assert model_widget.runner.last_status == "done", model_widget.runner.last_error
    session = model_widget.session
    assert session.info["arch"] == "mobilenet_v2" and session.info["strategy"] == "i3d"
    assert session.info["parameters"] == 3_635_048  # 3,504,872 in 2D; 3x3 kernels gain a depth of 3
    assert "314 tensors loaded: 0 missing, 0 unexpected;" in model_widget.status.value
    assert session.model3d.crossd_meta.spatial_dims == 3

    # Features: an RGB PCA layer and the full stack, on the image's grid.
    run = dock(viewer, "Run (features, segmentation)")
    assert run.image.value is image
    run.keep_stack.value = True
    run.run()
    # The call returned while the job runs in its worker thread: the GUI stays live. (How long
    # the event loop stalls is a benchmark, docs/make_screenshots.py -> results/gui_stall.md.)
    assert run.runner.busy
    wait_idle(qtbot, run)
    assert run.runner.last_status == "done", run.runner.last_error
    pca, stack = viewer.layers["mni_t1_crop features (PCA)"], viewer.layers["mni_t1_crop features"]
    assert pca.rgb and pca.data.shape == (32, 64, 64, 3)
    assert 0.0 <= pca.data.min() and pca.data.max() <= 1.0
    assert tuple(pca.scale) == tuple(image.scale) and tuple(pca.translate) == tuple(image.translate)
    assert stack.data.shape[1:] == (32, 64, 64) and stack.data.shape[0] >= 3
    assert tuple(stack.scale[1:]) == tuple(image.scale) and tuple(stack.translate[1:]) == tuple(image.translate)

    # Strokes: a new empty Labels layer, painted through the layer's own (undoable) setter.
    tune = dock(viewer, "Fine-tune (paint and train)")
    tune.image.value = image
    strokes_layer = tune.new_strokes()
    assert strokes_layer.data.shape == (32, 64, 64) and strokes_layer.data.max() == 0
    assert tuple(strokes_layer.translate) == tuple(image.translate)
    truth = mni_crop_files["truth"]
    painted = paint_strokes(truth, slices=5, seed=0)
    for cls in range(1, 5):
        strokes_layer.data_setitem(tuple(np.nonzero(painted == cls)), cls)
    np.testing.assert_array_equal(strokes_layer.data, painted)
    strokes_layer.metadata["class_names"] = ["background", "other", "grey matter", "white matter"]

    # Train: features of the painted voxels, then the forest; no loss curve (nothing is
    # trained by gradient steps unless the encoder is fine-tuned too).
    tune.train()
    assert tune.runner.busy
    wait_idle(qtbot, tune)
    assert tune.runner.last_status == "done", tune.runner.last_error
    assert tune.phase == "fit" and tune.losses == [] and tune.loss_plot.values == []
    assert tune.status.value.startswith(f"trained on {int((painted > 0).sum()):,} painted voxels, classes [1, 2, 3, 4]")
    segmenter = session.segmenter
    assert ("with auto-context" in tune.status.value) == segmenter.two_stage
    assert segmenter is not None and segmenter.class_names[2] == "grey matter"
    features = session.features[id(image.data)]
    assert features.block is not None  # kept for Predict and retraining

    # Predict: a new Labels layer on the image grid, checked against the tissue labels.
    tune.predict()
    wait_idle(qtbot, tune)
    assert tune.runner.last_status == "done", tune.runner.last_error
    result = viewer.layers["mni_t1_crop segmentation"]
    assert result.data.shape == (32, 64, 64)
    assert tuple(result.scale) == tuple(image.scale) and tuple(result.translate) == tuple(image.translate)
    scores = dice_scores(result.data, truth, range(1, 5))
    print(f"Dice per class: {scores}")
    for c, floor in DICE_FLOORS.items():
        assert scores[c] >= floor, scores

    # A corrective round: more strokes, Train again. The same segmenter and its cached
    # features: only the new voxels' features are computed, the encoder does not run again.
    more = paint_strokes(truth, slices=2, seed=3)
    for cls in range(1, 5):
        strokes_layer.data_setitem(tuple(np.nonzero((more == cls) & (painted == 0))), cls)
    block = features.block
    tune.train()
    wait_idle(qtbot, tune)
    assert tune.runner.last_status == "done", tune.runner.last_error
    assert session.segmenter is segmenter and session.features[id(image.data)] is features and features.block is block
    assert segmenter.trained_voxels == int((strokes_layer.data > 0).sum()) > int((painted > 0).sum())

    # Save, reload, and predict the same labels with the reloaded model.
    tune.folder.value = str(tmp_path / "segmenter")
    tune.save()
    wait_idle(qtbot, tune)
    assert tune.runner.last_status == "done", tune.runner.last_error
    assert any(p.suffix == ".safetensors" for p in (tmp_path / "segmenter").iterdir())
    layers = len(viewer.layers)
    tune.predict()
    wait_idle(qtbot, tune)
    # The untouched segmentation layer is updated in place: one layer per image in the loop.
    assert len(viewer.layers) == layers and viewer.layers["mni_t1_crop segmentation"] is result
    assert tune.status.value.endswith("updated")
    # Once painted on (a hand correction), it is never overwritten: the next Predict adds a layer.
    corner = (np.array([0]), np.array([0]), np.array([0]))
    result.data_setitem(corner, 3)
    tune.predict()
    wait_idle(qtbot, tune)
    assert len(viewer.layers) == layers + 1 and viewer.layers[-1] is not result
    assert result.data[0, 0, 0] == 3 and tune.status.value.endswith("added")
    before_reload = np.array(viewer.layers[-1].data)
    tune.load()
    wait_idle(qtbot, tune)
    assert session.segmenter is not segmenter and session.segmenter.num_classes == 4
    run.mode.value = "segmentation"
    run.run()
    wait_idle(qtbot, run)
    np.testing.assert_array_equal(viewer.layers[-1].data, before_reload)

    # The segmentation writes back on the source file's grid.
    [written] = result.save(str(tmp_path / "segmentation.nii.gz"), plugin=PLUGIN)
    out, source = nib.load(written), nib.load(mni_crop_files["t1"])
    assert out.shape == source.shape == (64, 64, 32)
    np.testing.assert_allclose(out.affine, source.affine)
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), result.data.transpose(2, 1, 0))

    np.testing.assert_array_equal(image.data, original)  # the user's image was never touched
    assert errors == []


def test_bad_inputs_notify_and_leave_layers_intact(qtbot, make_napari_viewer, tmp_path, errors):
    viewer = make_napari_viewer()
    flat = viewer.add_image(np.random.default_rng(0).random((64, 64)).astype(np.float32), name="flat")
    rgb = viewer.add_image(np.zeros((8, 32, 32, 3), dtype=np.uint8), name="rgb volume", rgb=True)
    assert rgb.rgb
    before = snapshot(viewer)

    model_widget = dock(viewer, "Model (load and inflate weights)")
    bogus = tmp_path / "not_a_network.pth"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, bogus)
    model_widget.checkpoint.value = str(bogus)
    model_widget.load()
    wait_idle(qtbot, model_widget)
    assert model_widget.runner.last_status == "failed"
    assert "not_a_network.pth" in errors[-1] and "closest" in errors[-1].lower()
    assert model_widget.session.model3d is None and model_widget.status.value == "no model loaded"

    if not torch.cuda.is_available():
        model_widget.device.value = "cuda"
        assert errors[-1] == ("Device 'cuda' was requested but torch sees no CUDA GPU here; "
                              "use --device cpu or auto.")
        assert model_widget.device.value == "auto" and model_widget.session.device == "auto"
        errors.pop()

    run = dock(viewer, "Run (features, segmentation)")
    run.image.value = flat
    run.run()
    assert "layer 'flat' is 2D with shape (64, 64): a 3D (Z, Y, X) volume is needed" in errors[-1]
    run.image.value = rgb
    run.run()
    assert "layer 'rgb volume' is RGB with shape (8, 32, 32, 3)" in errors[-1]
    viewer.add_image(np.zeros((8, 32, 32), dtype=np.float32), name="volume")
    before = snapshot(viewer)
    run.image.value = viewer.layers["volume"]
    run.run()
    assert errors[-1] == "no model loaded: load weights in the Cross-D Model widget first"

    tune = dock(viewer, "Fine-tune (paint and train)")
    tune.image.value = viewer.layers["volume"]
    tune.train()
    assert "no model loaded" in errors[-1]
    assert_unchanged(viewer, before)
    assert len(errors) == 5


def test_two_open_images_train_one_model_and_are_segmented_together(
    qtbot, viewer_with_crop, mni_crop_files, mni_sample, tmp_path, errors
):
    viewer, image = viewer_with_crop
    load_model_in_widget(qtbot, viewer)
    tune = dock(viewer, "Fine-tune (paint and train)")
    # a second real volume: the middle of the brain, 60 mm above the crop already open
    zyx = (slice(120, 152), slice(100, 164), slice(66, 130))
    other = viewer.add_image(mni_sample.image[zyx], name="middle")
    truths = {"mni_t1_crop": mni_crop_files["truth"], "middle": mni_sample.labels[zyx]}
    layers = {}
    for seed, layer in enumerate((other, image)):  # the crop last: it stays picked
        tune.image.value = layer
        strokes = tune.new_strokes()
        painted = paint_strokes(truths[layer.name], slices=4, seed=seed)
        strokes.data_setitem(tuple(np.nonzero(painted)), painted[np.nonzero(painted)])
        layers[layer.name] = (layer, strokes, painted)
    assert tune.strokes.value.name == "mni_t1_crop strokes"

    tune.train()
    wait_idle(qtbot, tune)
    assert tune.runner.last_status == "done", tune.runner.last_error
    painted_voxels = sum(int((p > 0).sum()) for _, _, p in layers.values())
    assert tune.session.segmenter.trained_voxels == painted_voxels
    trained = f"trained on {painted_voxels:,} painted voxels in 2 images (middle, mni_t1_crop)"
    assert tune.status.value.startswith(trained)
    assert set(tune.session.features) == {id(image.data), id(other.data)}

    tune.predict_all()
    wait_idle(qtbot, tune)
    assert tune.runner.last_status == "done", tune.runner.last_error
    for name, (layer, _, painted) in layers.items():
        result = viewer.layers[f"{name} segmentation"]
        unpainted = np.ones(result.data.shape[0], dtype=bool)
        unpainted[np.unique(np.nonzero(painted)[0])] = False
        scores = dice_scores(result.data[unpainted], truths[name][unpainted], [3, 4])
        assert scores[3] > 0.85 and scores[4] > 0.85, (name, scores)
        assert tuple(result.scale) == tuple(layer.scale)

    # the saved model on a folder: the command line's batch path, a bad file named, the others written
    folder = tmp_path / "images"
    folder.mkdir()
    np.save(folder / "middle.npy", other.data)
    np.save(folder / "flat.npy", np.zeros((8, 8), np.float32))
    tune.images_folder.value = str(folder)
    tune.output_folder.value = str(tmp_path / "labels")
    tune.segment_folder()
    wait_idle(qtbot, tune)
    assert tune.runner.last_status == "done", tune.runner.last_error
    assert tune.status.value.startswith(f"segmented 1/2 files into {tmp_path / 'labels'}; failed: flat.npy")
    written = np.load(tmp_path / "labels" / "middle.npy")
    np.testing.assert_array_equal(written, viewer.layers["middle segmentation"].data)

    viewer.layers.remove(other)  # its cached features go with it
    assert set(tune.session.features) == {id(image.data)}
    assert errors == []


def test_cancel_and_failure_keep_layers(qtbot, viewer_with_crop, mni_crop_files, errors):
    viewer, image = viewer_with_crop
    load_model_in_widget(qtbot, viewer)
    tune = dock(viewer, "Fine-tune (paint and train)")
    strokes = tune.new_strokes()
    painted = paint_strokes(mni_crop_files["truth"], slices=3, seed=1)
    strokes.data_setitem(tuple(np.nonzero(painted)), painted[np.nonzero(painted)])
    before = snapshot(viewer)

    # Only one class painted: refused with the engine's reason before any work starts.
    one_class = viewer.add_labels(np.where(painted == 1, 1, 0).astype(np.uint8), name="one class")
    tune.strokes.value = one_class
    tune.train()
    assert errors[-1] == ("Only class 1 is annotated: paint strokes of at least two classes so there is "
                          "something to tell apart.")
    viewer.layers.remove(one_class)

    # Cancel while the encoder is fine-tuned: no new layer, strokes unchanged, no model.
    tune.strokes.value = strokes
    tune.full.value = True
    tune.steps.value = 2000
    tune.train()
    qtbot.waitUntil(lambda: len(tune.losses) >= 2, timeout=WAIT_MS)
    tune.cancel_button.changed.emit(True)
    wait_idle(qtbot, tune)
    assert tune.runner.last_status == "cancelled"
    assert 2 <= len(tune.losses) < 2000 and len(tune.loss_plot.values) == len(tune.losses)
    assert_unchanged(viewer, before)
    assert tune.session.segmenter is None and tune.status.value.startswith("training cancelled")

    # Trained once (frozen encoder), for the failure below.
    tune.full.value = False
    tune.train()
    wait_idle(qtbot, tune)
    assert tune.runner.last_status == "done", tune.runner.last_error

    # A failure inside the engine (labels that do not fit the volume, sneaked past the widget's
    # checks) arrives as a notification; layers stay as they were.
    from napari_crossd.engine import finetune_job

    tune.runner.start(lambda: finetune_job(tune.session.segmenter, image.data, painted[:5]),
                      lambda _: None, "Fine-tune")
    wait_idle(qtbot, tune)
    assert tune.runner.last_status == "failed"
    assert errors[-1] == ("Fine-tune failed: The labels have shape (5, 64, 64); "
                          "expected the image's shape (32, 64, 64).")
    assert_unchanged(viewer, before)


def inspector_layer(viewer, role):
    from napari_crossd._widgets.inspector import ROLE

    [layer] = [layer for layer in viewer.layers if layer.metadata.get(ROLE) == role and layer.visible]
    return layer


def test_inspector_overview_picked_filter_rotation_and_phase(qtbot, viewer_with_crop, errors):
    """On the shipped default model (Cross-D MobileNetV2, dynamic rotation): what each layer shows, in numbers."""
    from napari_crossd.models.inspect import PHASE_FLOOR, rotate_bank

    viewer, _ = viewer_with_crop
    load_model_in_widget(qtbot, viewer)
    inspector = dock(viewer, "Inspector (kernels, rotations, phase)")
    assert inspector.layer.value == "features.0.0"
    assert not any("crossd_inspector" in layer.metadata for layer in viewer.layers)  # nothing until asked
    u = inspector.session.model2d.get_submodule("features.0.0").weights_3d.detach().float().numpy()
    assert u.shape == (32, 3, 3, 3, 3)

    def kernels_shown():  # kernels are computed in a worker
        qtbot.waitUntil(lambda: not inspector.kernel_jobs.busy, timeout=WAIT_MS)
        assert inspector.kernel_jobs.runner.last_status == "done", inspector.kernel_jobs.runner.last_error

    inspector.show_button.changed.emit(True)
    kernels_shown()
    # Overview: 32 RGB filters in 6 x 6 tiles, sorted by norm, each scaled to its own peak.
    overview = inspector_layer(viewer, "overview")
    assert overview.rgb and overview.data.shape == (3, 23, 23, 3)
    assert overview.name == "features.0.0: all 32 filters by norm, each scaled to its peak"
    assert overview.scale[0] * 3 == pytest.approx(32.0)  # kernel depth spans the volume's Z extent
    norms = np.sqrt((u.reshape(32, -1) ** 2).sum(1))
    order = inspector.view.order
    assert np.all(np.diff(norms[order]) <= 0)
    first = u[order[0]].transpose(1, 2, 3, 0)  # (d, h, w, rgb)
    np.testing.assert_allclose(overview.data[:, :3, :3], 0.5 + 0.5 * first / np.abs(first).max(), atol=1e-6)

    # One filter closely: output 5, input 1, its depth slices side by side, the model's own values.
    inspector.output.value = 5
    inspector.input.value = 1
    kernels_shown()
    strip = inspector_layer(viewer, "filter")
    assert strip.name == "features.0.0 o5 i1: depth slices d=0..2 side by side"
    assert strip.data.shape == (3, 11)
    for d in range(3):
        np.testing.assert_array_equal(strip.data[:, 4 * d : 4 * d + 3], u[5, 1, d])
    assert np.isnan(strip.data[:, 3]).all() and np.isnan(strip.data[:, 7]).all()
    # One colour scale for the filter and its rotation (30 deg about h, the default): symmetric.
    turned = rotate_bank(torch.as_tensor(u[5, 1])[None, None], "h", np.radians(30.0))[0, 0].numpy()
    limit = max(float(np.abs(u[5, 1]).max()), float(np.abs(turned).max()))
    assert tuple(strip.contrast_limits) == pytest.approx((-limit, limit))
    assert tuple(inspector_layer(viewer, "rotation").contrast_limits) == pytest.approx((-limit, limit))
    assert strip.colorbar.visible and strip.colormap.name == "PiYG"
    assert f"{u[5, 1, 0, 0, 0]:+.3f}" in inspector.filter_numbers.value
    # The outline sits on the filter's tile of the overview (tiles are 3 x 3 pixels, 1 apart).
    outline = inspector_layer(viewer, "outline")
    position = int(np.nonzero(order == 5)[0][0])
    row, col = divmod(position, 6)
    (_, sy, sx), (_, ty, tx) = overview.scale, overview.translate
    np.testing.assert_allclose(outline.data[0].min(0), [ty + (4 * row - 0.5) * sy, tx + (4 * col - 0.5) * sx])
    inspector.input.value = -1  # mean over inputs
    kernels_shown()
    np.testing.assert_allclose(strip.data[:, 4:7], u[5].mean(0)[1], rtol=1e-6)

    # U | rotated U | applied 2D kernel, one symmetric colour scale; phase masked where no energy.
    # Filter 14 (mean over inputs) at 40 deg about h: 3 of its 27 spectrum bins (U's or the
    # rotated U's) are below 5% of the peak amplitude (measured on the shipped weights).
    inspector.output.value = 14
    inspector.angle.value = 40.0
    kernels_shown()
    rotation = inspector_layer(viewer, "rotation")
    assert rotation.data.shape == (3, 3, 11)
    expected = rotate_bank(torch.as_tensor(u[14].mean(0))[None, None], "h", np.radians(40.0))[0, 0].numpy()
    np.testing.assert_allclose(rotation.data[:, :, :3], u[14].mean(0), rtol=1e-6)
    np.testing.assert_allclose(rotation.data[:, :, 4:7], expected, atol=1e-6)
    for d in range(3):  # the 2D kernel is the rotated U's central slice, shown on every depth plane
        np.testing.assert_allclose(rotation.data[d, :, 8:], expected[1], atol=1e-6)
    low, high = rotation.contrast_limits
    assert low == -high and high == pytest.approx(max(np.abs(u[14].mean(0)).max(), np.abs(expected).max()))
    phase, amplitude = inspector_layer(viewer, "phase"), inspector_layer(viewer, "amplitude")
    assert phase.data.shape == amplitude.data.shape == (3, 3, 3)
    spectrum = np.abs(np.fft.fftshift(np.fft.fftn(u[14].mean(0))))
    turned = np.abs(np.fft.fftshift(np.fft.fftn(expected)))
    masked = (spectrum <= PHASE_FLOOR * spectrum.max()) | (turned <= PHASE_FLOOR * turned.max())
    np.testing.assert_array_equal(np.isnan(phase.data), masked)
    assert masked.sum() == 3 and np.abs(phase.data[~masked]).max() <= 180.0
    np.testing.assert_allclose(amplitude.data, spectrum / spectrum.max(), atol=1e-6)
    assert tuple(phase.contrast_limits) == (-180.0, 180.0) and phase.colorbar.visible
    assert "masked below 5% amplitude" in phase.name
    assert inspector.rotation_info.value.startswith("dynamic rotation: predicted per slice")
    assert "shown: display rotation, 40.00 deg about (d, h, w) = (0.000, 1.000, 0.000)" in inspector.rotation_info.value

    # A depthwise layer: 32 filters of one input each, grey tiles.
    inspector.layer.value = "features.1.conv.0.0"
    kernels_shown()
    assert inspector_layer(viewer, "overview").data.shape == (3, 23, 23)
    assert not inspector_layer(viewer, "overview").rgb
    assert inspector.output.max == 31 and inspector.input.choices == (-1, 0)
    assert errors == []


def test_inspector_learned_rotations_and_feature_maps(qtbot, viewer_with_crop, errors):
    viewer, image = viewer_with_crop
    load_model_in_widget(qtbot, viewer)
    inspector = dock(viewer, "Inspector (kernels, rotations, phase)")
    inspector.layer.value = "features.2.conv.1.0"  # picking a layer shows it
    qtbot.waitUntil(lambda: not inspector.kernel_jobs.busy, timeout=WAIT_MS)
    assert inspector.rotation_button.enabled
    inspector.slice_rotations()
    wait_idle(qtbot, inspector)
    assert inspector.runner.last_status == "done", inspector.runner.last_error
    axes, angles = inspector.rotations
    assert axes.shape == (32, 3) and angles.shape == (32,)
    assert np.abs(angles).max() <= np.pi / 4
    assert sum(inspector.rotation_plot.values) == 32 and len(inspector.rotation_plot.values) == 20
    assert inspector.rotation_info.value.startswith("dynamic rotation over 32 slices")
    vectors = inspector_layer(viewer, "axes")
    assert vectors.data.shape == (32, 2, 3)
    np.testing.assert_allclose(np.linalg.norm(vectors.data[:, 1], axis=1), 0.4 * 64)  # 64 mm in-plane extent
    z_world = [image.data_to_world((z, 0, 0))[0] for z in range(32)]
    np.testing.assert_allclose(vectors.data[:, 0, 0], z_world)  # each slice's arrow starts in that slice
    np.testing.assert_allclose(vectors.features["angle (deg)"], np.degrees(angles))

    # The learned rotation of the slice under the dims slider: the 2D kernel this slice gets.
    inspector.mode.value = "learned by the layer"
    viewer.dims.set_point(0, image.data_to_world((7, 0, 0))[0])
    qtbot.waitUntil(lambda: not inspector.kernel_jobs.busy, timeout=WAIT_MS)
    shown = inspector.shown
    assert shown.what == "learned rotation predicted for slice 7"
    np.testing.assert_allclose(shown.rotation.rotvec, axes[7] * angles[7])

    # Feature maps of a chosen channel, on the volume's grid (level 0 has stride 2), over the image.
    inspector.level.value = 0
    inspector.show_features()
    wait_idle(qtbot, inspector)
    assert inspector.runner.last_status == "done", inspector.runner.last_error
    inspector.channel.value = 5
    feature = inspector_layer(viewer, "feature map")
    assert feature.name == "feature map level 0 channel 5 (stride 2 x 2 x 2) over mni_t1_crop"
    assert feature.data.shape == (16, 32, 32)
    assert tuple(feature.scale) == (2.0, 2.0, 2.0)
    np.testing.assert_allclose(feature.translate, np.asarray(image.translate) + 0.5)
    assert tuple(feature.contrast_limits) == pytest.approx((feature.data.min(), feature.data.max()))
    assert errors == []


def test_inspector_computes_off_the_gui_thread_and_the_latest_angle_wins(qtbot, viewer_with_crop, monkeypatch,
                                                                         errors):
    """Kernel rotation and FFTs run in a worker; ticks that come faster than the work collapse to the last."""
    import math
    import threading
    import time

    from napari_crossd.models import inspect

    viewer, _ = viewer_with_crop
    load_model_in_widget(qtbot, viewer)
    inspector = dock(viewer, "Inspector (kernels, rotations, phase)")
    rotate_bank, calls = inspect.rotate_bank, []

    def slow_rotate_bank(kernels, axis, angle, support=None):
        calls.append((round(math.degrees(angle)), threading.current_thread() is threading.main_thread()))
        time.sleep(1.0)  # slower than the slider
        return rotate_bank(kernels, axis, angle, support)

    monkeypatch.setattr(inspect, "rotate_bank", slow_rotate_bank)
    begin = time.perf_counter()
    inspector.show_button.changed.emit(True)  # at the default 30 deg
    for angle in (10.0, 20.0, 40.0, 50.0):
        inspector.angle.value = angle
    assert time.perf_counter() - begin < 0.5  # the GUI thread did not wait for any rotation
    qtbot.waitUntil(lambda: not inspector.kernel_jobs.busy, timeout=WAIT_MS)
    assert inspector.kernel_jobs.runner.last_status == "done", inspector.kernel_jobs.runner.last_error
    assert calls == [(30, False), (50, False)]  # 10, 20 and 40 were replaced while 30 ran
    u = inspector.view.u[0].mean(0)  # output 0, mean over inputs: the defaults
    expected = rotate_bank(u[None, None], "h", math.radians(50.0))[0, 0].numpy()
    np.testing.assert_allclose(inspector_layer(viewer, "rotation").data[:, :, 4:7], expected, atol=1e-6)
    assert errors == []


def test_demo_window_docks_widgets_and_loads_sample_and_weights(qtbot, make_napari_viewer, errors):
    from napari_crossd.demo import open_viewer

    viewer, widgets = open_viewer(region="small", viewer=make_napari_viewer(show=True))
    assert set(widgets) == {"Model", "Run", "Fine-tune", "Inspector"}
    assert len(viewer.window.dock_widgets) == 4
    # Tabbed, not stacked: every widget one click away, the canvas most of a 1600 x 1000 window.
    from qtpy.QtWidgets import QDockWidget

    window = viewer.window._qt_window
    docks = [w for w in window.findChildren(QDockWidget) if w.windowTitle().endswith("(napari-crossd)")]
    assert len(docks) == 4
    # Qt lays out tabified docks on a later turn of the event loop
    qtbot.waitUntil(lambda: len(window.tabifiedDockWidgets(docks[0])) == 3, timeout=5000)
    window.resize(1600, 1000)
    qtbot.wait(200)
    assert viewer.window._qt_viewer.canvas.native.width() >= 800
    image, tissue = viewer.layers["MNI152 T1"], viewer.layers["MNI152 tissue"]
    assert image.data.shape == tissue.data.shape == (32, 64, 64)
    assert tuple(image.translate) == (-12.0, -114.0, -32.0)
    wait_idle(qtbot, widgets["Model"])
    assert widgets["Model"].session.info["arch"] == "crossd_mobilenet_v2"
    assert widgets["Run"].image.value is image
    assert widgets["Inspector"].layer.value == "features.0.0"  # the inspector follows the model
    assert errors == []


def test_stall_meter_sees_a_blocked_event_loop(qtbot):
    """The meter behind benchmarks/results/gui_stall.md: a 300 ms block on the GUI thread shows as a stall."""
    import time

    from napari_crossd._widgets._stall import StallMeter

    meter = StallMeter(10)
    meter.start()
    qtbot.wait(100)  # ticks while the loop is free
    time.sleep(0.3)  # the GUI thread busy, as if a job ran there
    qtbot.wait(100)
    meter.stop()
    assert len(meter.gaps_ms) >= 5
    assert meter.worst_ms >= 290, meter.gaps_ms
    assert meter.percentile_ms(50) < meter.worst_ms
    assert meter.percentile_ms(100) == meter.worst_ms


def test_stall_sampler_names_the_function_that_blocked_the_event_loop(qtbot):
    """make_screenshots --stall-stacks: the GUI thread's stack during a stall, per stretch of beats."""
    import time

    from napari_crossd._widgets._stall import StallMeter, StallSampler

    def hold_the_gui_thread():
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:  # Python code: the sampler gets the GIL between bytecodes
            pass

    meter = StallMeter(10)
    sampler = StallSampler(meter, overdue_ms=50, every_ms=5)
    meter.start()
    sampler.start()
    qtbot.wait(100)
    before = len(meter.gaps_ms)
    hold_the_gui_thread()
    qtbot.wait(100)
    sampler.stop()
    meter.stop()
    report = sampler.report("held", before, len(meter.gaps_ms))
    assert "hold_the_gui_thread" in report, report
    assert "the worst stall" in report
