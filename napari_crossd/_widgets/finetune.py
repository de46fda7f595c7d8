"""Fine-tune widget: paint strokes, train the voxel classifier, predict, paint corrections, retrain, save."""

from __future__ import annotations

import numpy as np
from magicgui.widgets import CheckBox, Container, FileEdit, Label, PushButton, SpinBox

from ._common import LayerPicker, check_volume_layer, derived_kwargs, volume_data
from ._jobs import JobRunner
from ._plot import CurvePlot
from ._session import session_for

__all__ = ["FinetuneWidget"]


class FinetuneWidget(Container):
    """Train on a Labels layer of strokes (0 = not annotated, 1..N classes).

    Train fits a random forest on the painted voxels' features (filter bank and encoder
    levels, computed once per image and kept in the session); after more strokes, Train
    again refits on all of them in a second or two. "Also fine-tune the encoder" first
    adapts the encoder itself on crops around the strokes (its loss is plotted): for images
    unlike anything the weights have seen, at the price of computing every feature again.
    """

    def __init__(self, napari_viewer) -> None:
        import napari

        self.viewer = napari_viewer
        self.session, self.events = session_for(napari_viewer)
        self.image = LayerPicker(napari_viewer, napari.layers.Image, "image")
        self.strokes = LayerPicker(napari_viewer, napari.layers.Labels, "strokes")
        self.new_strokes_button = PushButton(text="New strokes layer")
        self.full = CheckBox(text="also fine-tune the encoder (slow; for unfamiliar images)", value=False)
        self.steps = SpinBox(label="encoder steps", value=150, min=1, max=100_000)
        self.train_button = PushButton(text="Train")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.predict_button = PushButton(text="Predict")
        self.folder = FileEdit(label="model folder", mode="d")
        self.save_button = PushButton(text="Save model")
        self.load_button = PushButton(text="Load model")
        self.status = Label(value="paint classes 1..N in a strokes layer, then Train")
        super().__init__(widgets=[
            self.image, self.strokes, self.new_strokes_button, self.full, self.steps,
            self.train_button, self.cancel_button, self.predict_button,
            self.folder, self.save_button, self.load_button, self.status,
        ])
        self.loss_plot = CurvePlot("encoder fine-tuning loss")
        self.native.layout().insertWidget(7, self.loss_plot)
        self.runner = JobRunner(on_busy=self._busy)
        self.new_strokes_button.changed.connect(self.new_strokes)
        self.train_button.changed.connect(self.train)
        self.cancel_button.changed.connect(self.runner.cancel)
        self.predict_button.changed.connect(self.predict)
        self.save_button.changed.connect(self.save)
        self.load_button.changed.connect(self.load)
        self.losses: list[float] = []
        self.phase = ""  # the running job's phase (Progress.phase)

    def _busy(self, busy: bool) -> None:
        for button in (self.train_button, self.predict_button, self.save_button, self.load_button):
            button.enabled = not busy
        self.cancel_button.enabled = busy

    def new_strokes(self, _=None):
        """An empty Labels layer on the image's grid, selected and in paint mode."""
        layer = self.image.value
        try:
            check_volume_layer(layer, "New strokes need")
        except ValueError as err:
            self.runner.fail(str(err))
            return None
        kwargs = derived_kwargs(layer, f"{layer.name} strokes")
        strokes = self.viewer.add_labels(np.zeros(volume_data(layer).shape, dtype=np.uint8), **kwargs)
        strokes.mode = "paint"
        strokes.selected_label = 1
        self.strokes.value = strokes
        return strokes

    def _inputs(self):
        layer, strokes = self.image.value, self.strokes.value
        check_volume_layer(layer, "Fine-tuning needs")
        self.session.require_model()
        if strokes is None:
            raise ValueError("no strokes layer: click 'New strokes layer' and paint classes 1..N")
        if tuple(strokes.data.shape) != tuple(volume_data(layer).shape):
            raise ValueError(f"strokes {tuple(strokes.data.shape)} and image {tuple(volume_data(layer).shape)} "
                             "differ in shape: paint on a layer made with 'New strokes layer'")
        return layer, strokes

    def _segmenter_for(self, classes: int, names):
        from napari_crossd.engine import Segmenter

        current = self.session.segmenter
        if current is not None and current.num_classes >= classes and current.encoder is self.session.model3d:
            return current  # the same model: its features of this image are cached
        return Segmenter(self.session.model3d, list(names) if names else classes)

    def train(self, _=None):
        from napari_crossd.engine import Annotations

        try:
            layer, strokes = self._inputs()
            labels = np.array(strokes.data)  # a snapshot: painting may go on while training runs
            annotations = Annotations.from_labels(labels)  # the engine's label rule, checked before starting
            names = strokes.metadata.get("class_names")
            names = names if names and len(names) == annotations.num_classes else None
            segmenter = self._segmenter_for(annotations.num_classes, names)
        except ValueError as err:
            self.runner.fail(str(err))
            return None
        from napari_crossd.engine import finetune_job

        volume = volume_data(layer)
        spacing = tuple(float(s) for s in layer.scale[-3:])
        steps, full, device = self.steps.value, self.full.value, self.session.device
        features = self.session.features_for(segmenter, volume, spacing)
        self.losses = []
        self.loss_plot.clear()

        def progress(report) -> None:
            self.phase = report.phase
            if report.phase == "encoder" and report.loss is not None:
                self.losses.append(float(report.loss))
                self.loss_plot.append(report.loss)

        def done(result) -> None:
            self.session.segmenter = segmenter
            self.events.segmenter_changed.emit(segmenter)
            tuned = f"; encoder fine-tuned {result['encoder']['steps']} steps" if result["encoder"] else ""
            self.status.value = (f"trained on {result['voxels']:,} painted voxels, classes {result['classes']}, "
                                 f"{result['channels']} features{tuned}")

        def make():
            return finetune_job(segmenter, volume, labels, features=features, spacing=spacing, steps=steps,
                                full=full, device=device)

        def cancelled() -> None:
            # Training changes the segmenter only once it is complete: the last model stays.
            self.status.value = "training cancelled; the previous model (if any) is kept"

        return self.runner.start(make, done, "Fine-tune", on_progress=progress, on_cancel=cancelled)

    def predict(self, _=None):
        layer = self.image.value
        try:
            check_volume_layer(layer, "Predict needs")
            if self.session.segmenter is None:
                raise ValueError("nothing trained yet: Train on strokes or Load a saved model first")
        except ValueError as err:
            self.runner.fail(str(err))
            return None
        from napari_crossd.engine import segment_job

        segmenter, volume = self.session.segmenter, volume_data(layer)
        spacing = tuple(float(s) for s in layer.scale[-3:])
        device = self.session.device
        features = self.session.features_for(segmenter, volume, spacing)

        def done(result) -> None:
            labels, _probabilities = result
            kwargs = derived_kwargs(layer, f"{layer.name} segmentation")
            self.viewer.add_labels(np.asarray(labels), **kwargs)
            self.status.value = f"segmentation {tuple(labels.shape)} added"

        return self.runner.start(lambda: segment_job(segmenter, volume, features=features, spacing=spacing,
                                                     device=device, probabilities=False), done, "Predict")

    def _folder(self) -> str:
        value = str(self.folder.value) if self.folder.value else ""
        if value in ("", "."):
            raise ValueError("choose a model folder first")
        return value

    def save(self, _=None):
        try:
            folder = self._folder()
            if self.session.segmenter is None:
                raise ValueError("nothing to save: Train first")
        except ValueError as err:
            self.runner.fail(str(err))
            return None
        from napari_crossd.engine import Progress, save_segmenter

        segmenter = self.session.segmenter

        def job():
            yield Progress(0, 1, f"writing {folder}")
            return save_segmenter(segmenter, folder)

        def done(paths) -> None:
            self.status.value = "saved " + ", ".join(str(p) for p in paths)

        return self.runner.start(job, done, "Save model")

    def load(self, _=None):
        try:
            folder = self._folder()
        except ValueError as err:
            self.runner.fail(str(err))
            return None
        from napari_crossd.engine import Progress, load_segmenter

        def job():
            yield Progress(0, 1, f"reading {folder}")
            return load_segmenter(folder)

        def done(segmenter) -> None:
            self.session.segmenter = segmenter
            self.events.segmenter_changed.emit(segmenter)
            self.status.value = f"loaded a {segmenter.num_classes}-class segmenter from {folder}"

        return self.runner.start(job, done, "Load model")
