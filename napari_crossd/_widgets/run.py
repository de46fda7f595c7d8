"""Run widget: features (PCA colour view, optionally the full stack) or segmentation of an Image layer."""

from __future__ import annotations

import napari
import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, Label, PushButton, SpinBox

from ._common import LayerPicker, check_volume_layer, derived_kwargs, volume_data
from ._jobs import JobRunner
from ._session import session_for

__all__ = ["RunWidget", "features_pca_job"]

FEATURES, SEGMENTATION = "features", "segmentation"


def features_pca_job(model3d, volume, *, spacing, stride, device, keep_stack: bool):
    """Generator: features of ``volume`` and their PCA colour view.

    Returns (rgb, stack, stack display range), the last two None unless ``keep_stack``.
    """
    # torch on first use: npe2 imports the widget modules before any model is loaded
    from napari_crossd.engine import Progress, features_job, pca_rgb

    features = yield from features_job(model3d, volume, spacing=spacing, stride=stride, device=device)
    features = np.asarray(features)
    yield Progress(0, None, "PCA of the features")
    rgb = pca_rgb(features)
    if not keep_stack:
        return np.asarray(rgb), None, None
    # The stack's display range, here rather than in napari's add_image on the GUI thread.
    low, high = (float(v) for v in np.percentile(features[:, ::2, ::2, ::2], (0.5, 99.5)))
    return np.asarray(rgb), features, (low, high if high > low else low + 1.0)


class RunWidget(Container):
    """On the selected Image layer: extract features or segment with the current model."""

    def __init__(self, napari_viewer) -> None:
        self.viewer = napari_viewer
        self.session, self.events = session_for(napari_viewer)
        self.image = LayerPicker(napari_viewer, napari.layers.Image, "image")
        self.mode = ComboBox(label="output", choices=(FEATURES, SEGMENTATION), value=FEATURES)
        self.keep_stack = CheckBox(text="also add the full feature stack", value=False)
        self.stride = SpinBox(label="feature stride", value=1, min=1, max=8,
                              tooltip="1: features at every voxel; 2, 4: on a coarser grid (faster)")
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.status = Label(value="")
        super().__init__(widgets=[self.image, self.mode, self.keep_stack, self.stride,
                                  self.run_button, self.cancel_button, self.status])
        self.runner = JobRunner(on_busy=self._busy)
        self.append(self.runner.progress)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.runner.cancel)

    def _busy(self, busy: bool) -> None:
        self.run_button.enabled = not busy
        self.cancel_button.enabled = busy

    def run(self, _=None):
        layer = self.image.value
        try:
            check_volume_layer(layer, "Run needs")
            self.session.require_model()
            if self.mode.value == SEGMENTATION and self.session.segmenter is None:
                raise ValueError("no segmentation head yet: fine-tune on strokes (Fine-tune widget) "
                                 "or load a saved segmenter there")
        except ValueError as err:
            self.runner.fail(str(err))
            return None
        volume = volume_data(layer)
        spacing = tuple(float(s) for s in layer.scale[-3:])
        device = self.session.device
        if self.mode.value == FEATURES:
            model3d, stride, keep = self.session.model3d, self.stride.value, self.keep_stack.value

            def make():
                return features_pca_job(model3d, volume, spacing=spacing, stride=stride, device=device,
                                        keep_stack=keep)

            return self.runner.start(make, lambda result: self._add_features(layer, *result), "Features")
        # torch on first use: npe2 imports the widget modules before any model is loaded
        from napari_crossd.engine import segment_job

        segmenter = self.session.segmenter
        features = self.session.features_for(segmenter, volume, spacing) if segmenter is not None else None
        return self.runner.start(lambda: segment_job(segmenter, volume, features=features, spacing=spacing,
                                                     device=device, probabilities=False),
                                 lambda result: self._add_segmentation(layer, *result), "Segment")

    def _add_features(self, source, rgb, stack, limits) -> None:
        zoom = np.asarray(source.data.shape[-3:]) / np.asarray(rgb.shape[:3])
        zoom = None if np.allclose(zoom, 1) else zoom
        kwargs = derived_kwargs(source, f"{source.name} features (PCA)", zoom=zoom)
        self.viewer.add_image(rgb, rgb=True, contrast_limits=(0.0, 1.0), **kwargs)
        if stack is not None:
            kwargs = derived_kwargs(source, f"{source.name} features", leading=1, zoom=zoom)
            self.viewer.add_image(stack, colormap="viridis", visible=False, contrast_limits=limits, **kwargs)
        self.status.value = f"features {tuple(rgb.shape[:3])} x {stack.shape[0] if stack is not None else 'PCA 3'}"

    def _add_segmentation(self, source, labels, probabilities) -> None:
        names = getattr(self.session.segmenter, "class_names", None)
        kwargs = derived_kwargs(source, f"{source.name} segmentation")
        if names:
            kwargs["metadata"]["class_names"] = list(names)
        self.viewer.add_labels(np.asarray(labels), **kwargs)
        self.status.value = f"segmentation {tuple(labels.shape)}, classes {sorted(np.unique(labels).tolist())}"
