"""Inspector widget: a layer's synthesized 3D kernels, their rotation and Fourier phase shift,
the learned rotation (per slice for dynamic layers) and feature maps. Numerics in
:mod:`napari_crossd.models.inspect`; this widget only lays their results out as layers.

Kernel layers are placed beside the volume being inspected: their k kernel slices span the
volume's Z extent, so napari's dims slider steps through kernel depth while it steps
through the volume, and the grid fits in a box of the volume's size to its right.

Reading, rotating and Fourier-transforming kernels runs in a worker (:func:`kernel_view_job`),
one request at a time: while the angle slider moves faster than the work, only its newest
value waits to be computed (:class:`~._jobs.LatestJob`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import napari
import numpy as np
from magicgui.widgets import ComboBox, Container, FloatSlider, Label, PushButton, Slider, SpinBox

from ._common import LayerPicker, check_volume_layer, volume_data
from ._jobs import JobRunner, LatestJob
from ._plot import CurvePlot
from ._session import session_for

if TYPE_CHECKING:  # annotations only: the widget imports the engine where it first needs it
    import torch
    from torch import nn

    from napari_crossd.models.inspect import KernelGrid, LearnedRotation

__all__ = ["InspectorWidget", "KernelView", "kernel_view_job"]

MAX_OUT, MAX_IN = 32, 16
ROLE = "crossd_inspector"
KERNELS, ROTATED, PHASE, FEATURE = "kernels", "rotated kernels", "phase shift", "feature map"


@dataclass(frozen=True)
class KernelView:
    """What the kernel layers show of one network layer.

    Attributes:
        module: the network layer; name: its name in the model.
        shape: its whole kernel bank's shape; bank: the kernels drawn (at most
            ``MAX_OUT`` x ``MAX_IN``); grid: their layout for display.
        learned: the layer's learned rotation.
    """

    module: nn.Module
    name: str
    shape: tuple[int, ...]
    bank: torch.Tensor
    grid: KernelGrid
    learned: LearnedRotation


def kernel_view_job(module, name: str, axis: str, angle: float, shown: KernelView | None = None):
    """Generator (worker thread): ``module``'s kernels and their rotation by ``angle`` radians about ``axis``.

    ``shown``: this module's :class:`KernelView` already computed, reused instead of read again.

    Returns:
        (view, rotation): rotation is None for kernels that are not cubic (nothing to
        rotate), else (rotated grid, phase-shift grid in radians); both grids are
        :class:`~napari_crossd.models.inspect.KernelGrid`, the rotated one in the unit of
        ``view.grid`` and clipped to its display range.
    """
    # torch on first use: npe2 imports the widget modules before any model is loaded
    from napari_crossd.engine import Progress
    from napari_crossd.models.inspect import kernel_grid, layer_kernels, learned_rotation, phase_shift, rotate_bank

    view = shown
    if view is None:
        yield Progress(0, 3, f"kernels of {name}")
        bank = layer_kernels(module)
        drawn = bank[:MAX_OUT] if bank.shape[1] == 3 else bank[:MAX_OUT, :MAX_IN]
        view = KernelView(module, name, tuple(bank.shape), drawn, kernel_grid(drawn), learned_rotation(module))
    if len(set(view.bank.shape[-3:])) != 1:
        return view, None
    yield Progress(1, 3, f"rotating by {math.degrees(angle):.0f} deg about {axis}")
    rotated = rotate_bank(view.bank, axis, angle)
    grid = kernel_grid(rotated / (view.grid.peak or 1.0))
    # kernel_grid rescales to its own max |w|: undo it, so both layers share the kernels' unit
    # (a rotation keeps the L2 norm, not the peak).
    centre, limits = (0.5, (0.0, 1.0)) if grid.rgb else (0.0, (-1.0, 1.0))
    grid = replace(grid, data=np.clip(centre + (grid.data - centre) * grid.peak, *limits))
    yield Progress(2, 3, "phase shift")
    phase = kernel_grid(phase_shift(view.bank, rotated), rgb=False, max_out=MAX_OUT, max_in=MAX_IN)
    # kernel_grid scales by max |value|: undo it so the layer holds radians.
    phase = replace(phase, data=phase.data * phase.peak)
    return view, (grid, phase)


class InspectorWidget(Container):
    """Look inside the current network, layer by layer."""

    def __init__(self, napari_viewer) -> None:
        self.viewer = napari_viewer
        self.session, self.events = session_for(napari_viewer)
        self.image = LayerPicker(napari_viewer, napari.layers.Image, "volume")
        self.layer = ComboBox(label="network layer", choices=self._layer_choices)
        self.axis = ComboBox(label="rotate about", choices=("d", "h", "w"), value="h",
                             tooltip="axis of the display rotation, (d, h, w) = (Z, Y, X)")
        self.angle = FloatSlider(label="angle (deg)", value=30.0, min=-180.0, max=180.0, step=1.0)
        self.show_button = PushButton(text="Show kernels")
        self.rotation_info = Label(value="")
        self.rotation_button = PushButton(text="Rotation over the volume's slices")
        self.level = SpinBox(label="feature level", value=0, min=0, max=4)
        self.channel = Slider(label="channel", value=0, min=0, max=15)
        self.feature_button = PushButton(text="Show feature maps")
        self.status = Label(value="")
        super().__init__(widgets=[
            self.image, self.layer, self.show_button, self.axis, self.angle, self.rotation_info, self.rotation_button,
            self.level, self.channel, self.feature_button, self.status,
        ])
        self.rotation_plot = CurvePlot("per-slice rotation angle (deg)", bars=True)
        self.native.layout().insertWidget(7, self.rotation_plot)
        self.runner = JobRunner()
        self.kernel_jobs = LatestJob("Kernels")
        self.view = None  # the KernelView shown
        self.rotations = None  # (axes, angles) per slice from the last dynamic run
        self._maps = None  # (key, maps, zoom, source layer) from the last feature run
        # Kernel layers appear once the user asks (Show kernels, or picking a layer); from then
        # on a new model or layer updates them live.
        self.active = False
        self.show_button.changed.connect(self._activate)
        self.layer.changed.connect(self._layer_picked)
        self.axis.changed.connect(self.show_rotation)
        self.angle.changed.connect(self.show_rotation)
        self.rotation_button.changed.connect(self.slice_rotations)
        self.feature_button.changed.connect(self.show_features)
        self.channel.changed.connect(self._show_channel)
        self.events.model_changed.connect(self._model_changed)
        if self.session.model3d is not None:
            self._model_changed()

    # -- which model and layer ------------------------------------------------------------
    def source_model(self):
        """The 2D model when it holds Cross-D layers (learned rotations live there), else the 3D one."""
        # torch on first use: npe2 imports the widget modules before any model is loaded
        from napari_crossd.core import CrossDConv

        model2d = self.session.model2d
        if model2d is not None and any(isinstance(m, CrossDConv) for m in model2d.modules()):
            return model2d
        return self.session.model3d

    def _layer_choices(self, _widget=None):
        # torch on first use: npe2 imports the widget modules before any model is loaded
        from napari_crossd.models.inspect import conv_layers

        model = self.source_model() if self.session.model3d is not None else None
        return list(conv_layers(model)) if model is not None else []

    def _activate(self, _=None) -> None:
        self.active = True
        self.show_layer()

    def _layer_picked(self, _=None) -> None:
        if not self._resetting:
            self._activate()

    _resetting = False

    def _model_changed(self, _model=None) -> None:
        self._resetting = True
        try:
            self.layer.reset_choices()
            if self.layer.choices and self.layer.value not in self.layer.choices:
                self.layer.value = self.layer.choices[0]
        finally:
            self._resetting = False
        info = getattr(self.session.model3d, "feature_info", None) or []
        self.level.max = max(len(info) - 1, 0)
        self._maps = None
        if self.active:
            self.show_layer()

    def module(self):
        model = self.source_model()
        if model is None or not self.layer.value:
            return None
        return dict(model.named_modules()).get(self.layer.value)

    # -- placing the inspector's own layers ----------------------------------------------
    def _frame(self, grid_shape):
        """(scale, translate) that put a (k, H, W) grid beside the picked volume (see module doc)."""
        depth, height, width = grid_shape
        source = self.image.value
        if source is None or volume_data(source).ndim < 3 or getattr(source, "rgb", False):
            return (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)
        shape = np.asarray(volume_data(source).shape[-3:], dtype=float)
        scale = np.asarray(source.scale[-3:], dtype=float)
        origin = np.asarray(source.translate[-3:], dtype=float)
        extent = shape * scale
        pixel = float(min(extent[1] / height, extent[2] / width))
        z = extent[0] / depth
        translate = (origin[0] - scale[0] / 2 + z / 2, origin[1], origin[2] + extent[2] + 0.05 * extent[2])
        return (z, pixel, pixel), translate

    def _owned(self, role: str):
        for layer in self.viewer.layers:
            if layer.metadata.get(ROLE) == role:
                return layer
        return None

    def _put(self, role: str, data, *, rgb: bool = False, frame=None, **kwargs):
        """Show ``data`` in this widget's layer for ``role``: updated in place, or (re)created."""
        layer = self._owned(role)
        scale, translate = frame if frame is not None else self._frame(data.shape[:3])
        if layer is not None and bool(getattr(layer, "rgb", False)) == rgb and layer.ndim == data.ndim - rgb:
            layer.data = data
            layer.scale, layer.translate = scale, translate
            for key, value in kwargs.items():
                setattr(layer, key, value)
            return layer
        if layer is not None:
            self.viewer.layers.remove(layer)
        return self.viewer.add_image(data, rgb=rgb, scale=scale, translate=translate,
                                     name=f"Cross-D {role}", metadata={ROLE: role}, **kwargs)

    # -- kernels, rotation, phase ---------------------------------------------------------
    def show_layer(self, _=None) -> None:
        """Show the picked layer's kernels (read afresh: weights may have changed) and their rotation."""
        self._request_kernels(reuse=False)

    def show_rotation(self, _=None) -> None:
        """Show the shown kernels rotated by the current axis and angle."""
        if self.active:
            self._request_kernels(reuse=True)

    def _request_kernels(self, reuse: bool) -> None:
        module = self.module()
        if module is None:
            return
        view = self.view if reuse and self.view is not None and self.view.module is module else None
        name, axis, angle = self.layer.value, self.axis.value, math.radians(self.angle.value)
        self.kernel_jobs.submit(lambda: kernel_view_job(module, name, axis, angle, view), self._show_kernels)

    def _show_kernels(self, result) -> None:
        view, rotation = result
        self.view, grid = view, view.grid
        limits = (0.0, 1.0) if grid.rgb else (-1.0, 1.0)
        colours = {} if grid.rgb else {"colormap": "PiYG"}
        self._put(KERNELS, grid.data, rgb=grid.rgb, contrast_limits=limits, **colours)
        self.rotation_info.value = view.learned.describe()
        self.rotation_button.enabled = view.learned.kind == "dynamic"
        self.status.value = (f"{view.name}: kernels {view.shape}, shown {grid.shown[0]} x {grid.shown[1]} "
                             f"({grid.layout}), max |w| {grid.peak:.3g}")
        if rotation is None:
            for role in (ROTATED, PHASE):
                layer = self._owned(role)
                if layer is not None:
                    self.viewer.layers.remove(layer)
            return
        rotated, phase = rotation
        scale, translate = self._frame(rotated.data.shape[:3])
        below = (translate[0], translate[1] + scale[1] * (rotated.data.shape[1] + 4), translate[2])
        self._put(ROTATED, rotated.data, rgb=rotated.rgb, frame=(scale, below), contrast_limits=limits, **colours)
        right = (translate[0], translate[1], translate[2] + scale[2] * (grid.data.shape[2] + 4))
        self._put(PHASE, phase.data, frame=(scale, right), colormap="twilight", contrast_limits=(-math.pi, math.pi))

    # -- dynamic rotation over the volume -------------------------------------------------
    def _net_input(self, layer):
        # torch on first use: npe2 imports the widget modules before any model is loaded
        from napari_crossd.engine.normalize import network_volume

        return network_volume(volume_data(layer), self.session.model3d)

    def slice_rotations(self, _=None):
        layer = self.image.value
        try:
            check_volume_layer(layer, "The rotation distribution needs")
            module = self.module()
            # torch on first use: npe2 imports the widget modules before any model is loaded
            from napari_crossd.models.inspect import learned_rotation

            if module is None or learned_rotation(module).kind != "dynamic":
                raise ValueError(f"layer {self.layer.value!r} has no dynamic rotation: pick a Cross-D layer "
                                 "of a model loaded with rotation 'dynamic'")
        except ValueError as err:
            self.runner.fail(str(err))
            return None
        # torch on first use: npe2 imports the widget modules before any model is loaded
        from napari_crossd.engine import Progress
        from napari_crossd.models.inspect import dynamic_rotations

        model2d, name = self.session.model2d, self.layer.value

        def job():
            yield Progress(0, 2, "normalising the volume")
            slices = self._net_input(layer).transpose(0, 1)
            yield Progress(1, 2, f"predicting rotations of {slices.shape[0]} slices")
            return dynamic_rotations(model2d, name, slices)

        def done(result) -> None:
            axes, angles = result
            self.rotations = (axes, angles)
            degrees = np.degrees(angles)
            counts, edges = np.histogram(degrees, bins=24, range=(-45.0, 45.0))
            self.rotation_plot.set_values(counts, (f"{edges[0]:.0f} deg", f"{edges[-1]:.0f} deg"))
            mean_axis = axes.mean(0)
            self.rotation_info.value = (
                f"dynamic rotation over {len(angles)} slices: angle {degrees.mean():.2f} +- {degrees.std():.2f} deg "
                f"(min {degrees.min():.2f}, max {degrees.max():.2f}); mean axis (d, h, w) "
                f"({mean_axis[0]:.2f}, {mean_axis[1]:.2f}, {mean_axis[2]:.2f})"
            )

        return self.runner.start(job, done, "Slice rotations")

    # -- feature maps ---------------------------------------------------------------------
    def show_features(self, _=None):
        layer = self.image.value
        try:
            check_volume_layer(layer, "Feature maps need")
            self.session.require_model()
        except ValueError as err:
            self.runner.fail(str(err))
            return None
        # torch on first use: npe2 imports the widget modules before any model is loaded
        from napari_crossd.engine import Progress
        from napari_crossd.models.inspect import feature_maps

        model3d, level = self.session.model3d, self.level.value

        def job():
            yield Progress(0, 2, "normalising the volume")
            net_input = self._net_input(layer)
            yield Progress(1, 2, f"forward to level {level}")
            return feature_maps(model3d, net_input, level)

        def done(result) -> None:
            maps, zoom = result
            self._maps = ((id(model3d), level), maps, zoom, layer)
            self.channel.max = maps.shape[0] - 1
            self.channel.value = min(self.channel.value, maps.shape[0] - 1)
            self._show_channel()

        return self.runner.start(job, done, "Feature maps")

    def _show_channel(self, _=None) -> None:
        if self._maps is None:
            return
        (_, level), maps, zoom, source = self._maps
        channel = int(self.channel.value)
        data = maps[channel]
        scale = np.asarray(source.scale[-3:], dtype=float) * zoom
        translate = np.asarray(source.translate[-3:], dtype=float) + (zoom - 1) / 2 * np.asarray(source.scale[-3:])
        low, high = float(data.min()), float(data.max())
        layer = self._put(FEATURE, data, frame=(tuple(scale), tuple(translate)), colormap="inferno",
                          contrast_limits=(low, high if high > low else low + 1))
        layer.name = f"Cross-D feature map L{level} c{channel}"
        zoom_text = " x ".join(f"{z:g}" for z in zoom)
        self.status.value = f"feature map level {level} channel {channel}: {tuple(data.shape)}, stride {zoom_text}"
