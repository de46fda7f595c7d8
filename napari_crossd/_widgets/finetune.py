"""Fine-tune widget: paint strokes, train the voxel classifier, predict, paint corrections, retrain, save;
several open images train one model, and a saved model segments every open image or a folder."""

from __future__ import annotations

from pathlib import Path

import napari
import numpy as np
from magicgui.widgets import CheckBox, Container, FileEdit, Label, PushButton, SpinBox

from ._common import LayerPicker, check_volume_layer, derived_kwargs, volume_data
from ._jobs import JobRunner
from ._plot import CurvePlot
from ._session import session_for

__all__ = ["FinetuneWidget"]

# Metadata key of a strokes layer made by "New strokes layer": the name of its image.
STROKES_OF = "strokes_of"
# Metadata key of a segmentation layer that Predict may overwrite: the name of its image.
# Painting on the layer removes it, so hand corrections are never replaced.
PREDICTION_OF = "prediction_of"


class FinetuneWidget(Container):
    """Train on a Labels layer of strokes (0 = not annotated, 1..N classes).

    Train fits a random forest on the painted voxels' features (filter bank and encoder
    levels, computed once per image and kept in the session) and, where cross-validation over
    the painted planes says it pays, a second forest that also reads the first one's smoothed
    class maps (auto-context; the status line says so); after more strokes, Train again
    refits on all of them in a second or two. With "train on every open image's
    strokes", the strokes layers of the other images (made with "New strokes layer") train
    the same model. "Also fine-tune the encoder" first adapts the encoder itself on crops
    around the strokes (its loss is plotted): for images unlike anything the weights have
    seen, at the price of computing every feature again (one image only).

    "Segment all open images" labels every 3D image layer with the current model; "Segment
    folder" labels every volume file of a folder into another (the command line's batch path).
    """

    def __init__(self, napari_viewer) -> None:
        self.viewer = napari_viewer
        self.session, self.events = session_for(napari_viewer)
        self.image = LayerPicker(napari_viewer, napari.layers.Image, "image")
        self.strokes = LayerPicker(napari_viewer, napari.layers.Labels, "strokes")
        self.new_strokes_button = PushButton(text="New strokes layer")
        self.every_image = CheckBox(text="train on every open image's strokes", value=True)
        self.full = CheckBox(
            text="also fine-tune the encoder (slow; for unfamiliar images)", value=False,
            tooltip="Adapts the encoder to this image before the forest is trained. On the strokes suite's MRI, CT "
                    "and microscopy tasks it did not beat the forest on the shipped encoder and took 2-3x longer "
                    "(benchmarks/strokes/results/README.md); try it where the default features look poor.",
        )
        self.steps = SpinBox(label="encoder steps", value=150, min=1, max=100_000)
        self.train_button = PushButton(text="Train")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.predict_button = PushButton(text="Predict")
        self.predict_all_button = PushButton(text="Segment all open images")
        self.folder = FileEdit(label="model folder", mode="d")
        self.save_button = PushButton(text="Save model")
        self.load_button = PushButton(text="Load model")
        self.images_folder = FileEdit(label="images folder", mode="d")
        self.output_folder = FileEdit(label="output folder", mode="d")
        self.segment_folder_button = PushButton(text="Segment folder")
        self.status = Label(value="paint classes 1..N in a strokes layer, then Train")
        super().__init__(widgets=[
            self.image, self.strokes, self.new_strokes_button, self.every_image, self.full, self.steps,
            self.train_button, self.cancel_button, self.predict_button, self.predict_all_button,
            self.folder, self.save_button, self.load_button,
            self.images_folder, self.output_folder, self.segment_folder_button, self.status,
        ])
        self.loss_plot = CurvePlot("encoder fine-tuning loss")
        self.native.layout().insertWidget(8, self.loss_plot)
        self.runner = JobRunner(on_busy=self._busy)
        self.append(self.runner.progress)
        self.new_strokes_button.changed.connect(self.new_strokes)
        self.train_button.changed.connect(self.train)
        self.cancel_button.changed.connect(self.runner.cancel)
        self.predict_button.changed.connect(self.predict)
        self.predict_all_button.changed.connect(self.predict_all)
        self.segment_folder_button.changed.connect(self.segment_folder)
        self.save_button.changed.connect(self.save)
        self.load_button.changed.connect(self.load)
        self.losses: list[float] = []
        self.batch_results: list = []  # the last "Segment folder" run: one FileResult per file
        self.phase = ""  # the running job's phase (Progress.phase)

    def _busy(self, busy: bool) -> None:
        for button in (self.train_button, self.predict_button, self.predict_all_button, self.save_button,
                       self.load_button, self.segment_folder_button):
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
        kwargs["metadata"][STROKES_OF] = layer.name  # which image these strokes train on, with the others'
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
        # torch on first use: npe2 imports the widget modules before any model is loaded
        from napari_crossd.engine import Segmenter

        current = self.session.segmenter
        if current is not None and current.num_classes >= classes and current.encoder is self.session.model3d:
            return current  # the same model: its features of these images are cached
        return Segmenter(self.session.model3d, list(names) if names else classes)

    def _training_pairs(self) -> list:
        """(image, strokes) layers to train on: with "every open image", the latest strokes
        layer of each other image first; the picked pair last (its features stay for Predict)."""
        image, strokes = self._inputs()
        others = {}
        if self.every_image.value:
            images = {layer.name: layer for layer in self.viewer.layers if isinstance(layer, napari.layers.Image)}
            for layer in self.viewer.layers:
                source = images.get(layer.metadata.get(STROKES_OF)) if isinstance(layer, napari.layers.Labels) else None
                if (source is not None and source is not image and not getattr(source, "rgb", False)
                        and tuple(layer.data.shape) == tuple(volume_data(source).shape) and layer.data.any()):
                    others[source.name] = (source, layer)
        return [*others.values(), (image, strokes)]

    def _annotations(self, pairs) -> list:
        """Each strokes layer checked by the engine's label rule, before anything starts."""
        # torch on first use: npe2 imports the widget modules before any model is loaded
        from napari_crossd.engine.annotations import annotations_of_volumes

        snapshots = (np.array(strokes.data) for _, strokes in pairs)  # painting may go on while training runs
        return annotations_of_volumes(snapshots, [strokes.data.shape for _, strokes in pairs],
                                      [strokes.name for _, strokes in pairs])

    def train(self, _=None):
        try:
            pairs = self._training_pairs()
            if self.full.value and len(pairs) > 1:
                raise ValueError(f"encoder fine-tuning works on one image; {len(pairs)} have strokes: untick "
                                 "'train on every open image's strokes' or the encoder fine-tuning")
            annotations = self._annotations(pairs)
            names = pairs[-1][1].metadata.get("class_names")
            num_classes = max(a.num_classes for a in annotations)
            segmenter = self._segmenter_for(num_classes, names if names and len(names) == num_classes else None)
        except ValueError as err:
            self.runner.fail(str(err))
            return None
        # torch on first use: npe2 imports the widget modules before any model is loaded
        from napari_crossd.engine import finetune_pairs_job

        volumes = [volume_data(image) for image, _ in pairs]
        spacings = [tuple(float(s) for s in image.scale[-3:]) for image, _ in pairs]
        features = [self.session.features_for(segmenter, v, s) for v, s in zip(volumes, spacings, strict=True)]
        names = [image.name for image, _ in pairs]
        steps, full, device = self.steps.value, self.full.value, self.session.device
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
            where = f" in {len(pairs)} images ({', '.join(names)})" if len(pairs) > 1 else ""
            context = ", with auto-context" if result["context"]["used"] else ""
            self.status.value = (f"trained on {result['voxels']:,} painted voxels{where}, classes {result['classes']}, "
                                 f"{result['channels']} features{context}{tuned}")

        def make():
            return finetune_pairs_job(segmenter, list(zip(volumes, annotations, strict=True)), features=features,
                                      names=names, spacing=spacings, steps=steps, full=full, device=device)

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
        # torch on first use: npe2 imports the widget modules before any model is loaded
        from napari_crossd.engine import segment_job

        segmenter, volume = self.session.segmenter, volume_data(layer)
        spacing = tuple(float(s) for s in layer.scale[-3:])
        device = self.session.device
        features = self.session.features_for(segmenter, volume, spacing)

        def done(result) -> None:
            labels, _probabilities = result
            self.status.value = f"segmentation {tuple(labels.shape)} {self._show_segmentation(layer, labels)}"

        return self.runner.start(lambda: segment_job(segmenter, volume, features=features, spacing=spacing,
                                                     device=device, probabilities=False), done, "Predict")

    def _show_segmentation(self, image, labels, class_names=None) -> str:
        """Show ``image``'s labels: in the layer an earlier Predict made for it while nobody has
        painted on it (a paint-train-predict loop then keeps one layer, with the user's display
        settings), else in a new layer. Returns "updated" or "added"."""
        labels = np.asarray(labels)
        previous = next((other for other in self.viewer.layers if isinstance(other, napari.layers.Labels)
                         and other.metadata.get(PREDICTION_OF) == image.name and other.data.shape == labels.shape),
                        None)
        if previous is not None:
            previous.data = labels
            return "updated"
        kwargs = derived_kwargs(image, f"{image.name} segmentation")
        kwargs["metadata"][PREDICTION_OF] = image.name
        if class_names is not None:
            kwargs["metadata"]["class_names"] = list(class_names)
        added = self.viewer.add_labels(labels, **kwargs)
        added.events.paint.connect(lambda _event: added.metadata.pop(PREDICTION_OF, None))
        return "added"

    def predict_all(self, _=None):
        """Segment every open 3D image with the current model: one job, one progress bar."""
        images = [layer for layer in self.viewer.layers if isinstance(layer, napari.layers.Image)
                  and not getattr(layer, "rgb", False) and volume_data(layer).ndim == 3]
        try:
            if self.session.segmenter is None:
                raise ValueError("nothing trained yet: Train on strokes or Load a saved model first")
            if not images:
                raise ValueError("no 3D image is open")
        except ValueError as err:
            self.runner.fail(str(err))
            return None
        # torch on first use: npe2 imports the widget modules before any model is loaded
        from napari_crossd.engine import named_job, segment_job

        segmenter, device = self.session.segmenter, self.session.device
        inputs = [(layer.name, volume_data(layer), tuple(float(s) for s in layer.scale[-3:])) for layer in images]
        features = [self.session.features_for(segmenter, volume, spacing) for _, volume, spacing in inputs]

        def job():
            results = []
            for index, ((name, volume, spacing), cached) in enumerate(zip(inputs, features, strict=True)):
                labels, _ = yield from named_job(
                    segment_job(segmenter, volume, features=cached, spacing=spacing, device=device,
                                probabilities=False), f"{name} ({index + 1}/{len(inputs)})")
                cached.block = None  # one image's features in memory at a time
                results.append(labels)
            return results

        def done(results) -> None:
            for layer, labels in zip(images, results, strict=True):
                self._show_segmentation(layer, labels, segmenter.class_names)
            self.status.value = f"segmented {len(images)} images: {', '.join(layer.name for layer in images)}"

        return self.runner.start(job, done, "Segment all")

    def segment_folder(self, _=None):
        """Label every volume file of the images folder into the output folder, each in its
        own format and on its own grid (what ``crossd segment --out-dir`` does)."""
        # torch on first use: npe2 imports the widget modules before any model is loaded
        from napari_crossd.engine.batch import output_paths, segment_files_job, volume_files

        try:
            if self.session.segmenter is None:
                raise ValueError("nothing trained yet: Train on strokes or Load a saved model first")
            inputs = volume_files(_chosen(self.images_folder, "an images folder"))
            out_dir = _chosen(self.output_folder, "an output folder")
            outputs = output_paths(inputs, out_dir)
        except ValueError as err:
            self.runner.fail(str(err))
            return None
        segmenter, device = self.session.segmenter, self.session.device

        def job():
            out_dir.mkdir(parents=True, exist_ok=True)
            return (yield from segment_files_job(segmenter, inputs, outputs, device=device))

        def done(results) -> None:
            failed = [f"{r.source.name} ({r.error})" for r in results if not r.ok]
            self.status.value = (f"segmented {len(results) - len(failed)}/{len(results)} files into {out_dir}"
                                 + (f"; failed: {'; '.join(failed)}" if failed else ""))
            self.batch_results = results

        return self.runner.start(job, done, "Segment folder")

    def _folder(self) -> str:
        return str(_chosen(self.folder, "a model folder"))

    def save(self, _=None):
        try:
            folder = self._folder()
            if self.session.segmenter is None:
                raise ValueError("nothing to save: Train first")
        except ValueError as err:
            self.runner.fail(str(err))
            return None
        # torch on first use: npe2 imports the widget modules before any model is loaded
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
        # torch on first use: npe2 imports the widget modules before any model is loaded
        from napari_crossd.engine import Progress, load_segmenter

        def job():
            yield Progress(0, 1, f"reading {folder}")
            return load_segmenter(folder)

        def done(segmenter) -> None:
            self.session.segmenter = segmenter
            self.events.segmenter_changed.emit(segmenter)
            self.status.value = f"loaded a {segmenter.num_classes}-class segmenter from {folder}"

        return self.runner.start(job, done, "Load model")


def _chosen(edit: FileEdit, what: str) -> Path:
    """The folder a FileEdit holds, or a ValueError asking for ``what``."""
    value = str(edit.value) if edit.value else ""
    if value in ("", "."):
        raise ValueError(f"choose {what} first")
    return Path(value)
