"""Inspector widget: one network layer's filters, one filter closely, its rotation and Fourier
phase shift, the learned rotations and feature maps. Numerics in
:mod:`napari_crossd.models.inspect`; what one request computes and where its layers go in
:mod:`._inspector_views`; this widget only lays the results out as layers.

Layers (each named by network layer, channel and what it shows; kernels in a diverging map
centred at zero with symmetric colour limits; colour bars on the picked filter and the phase):

* overview: every filter of the layer (up to 32 x 16), sorted by norm, each scaled to its own
  peak; the picked filter outlined (a Shapes layer);
* the picked filter (output channel, input channel or the mean over inputs): its k depth
  slices side by side, magnified, in the model's own values (the numbers also in the widget);
* U | rotated U | applied 2D kernel (the central slice, what a 2D forward convolves with), one
  colour scale, for the axis and angle of the sliders or the layer's learned rotation;
* the phase shift of that rotation in degrees (cyclic map), NaN (not drawn) where the
  spectrum's amplitude is below ``PHASE_FLOOR`` of its peak, with the amplitude beside it;
* for dynamic layers, the rotation predicted per slice of the open volume: a histogram of
  angles in the widget and the axes as a Vectors layer (view in 3D);
* a feature map of a chosen level and channel, on the volume's grid, over the image.

Kernels are read, rotated and Fourier-transformed in a worker, one request at a time: while a
slider moves faster than the work, only its newest value waits (:class:`~._jobs.LatestJob`).
"""

from __future__ import annotations

import math

import napari
import numpy as np
from magicgui.widgets import ComboBox, Container, FloatSlider, Label, PushButton, Slider, SpinBox

from ._common import LayerPicker, check_volume_layer, set_visible, volume_data
from ._inspector_views import FilterRequest, Geometry, kernel_view_job, numbers_text
from ._jobs import JobRunner, LatestJob
from ._plot import CurvePlot
from ._session import session_for

__all__ = ["InspectorWidget", "kernel_view_job"]

ROLE = "crossd_inspector"
OVERVIEW, OUTLINE, FILTER, ROTATION = "overview", "outline", "filter", "rotation"
PHASE, AMPLITUDE, AXES, FEATURE = "phase", "amplitude", "axes", "feature map"
MEAN = -1  # the input channel choice "mean over inputs"
DISPLAY, LEARNED = "axis and angle below", "learned by the layer"
HISTOGRAM_BINS = 20  # over the angles' own range (whole degrees): |angle| <= 45 deg
KERNEL_MAP = "PiYG"  # diverging, zero in the middle (white)


class InspectorWidget(Container):
    """Look inside the current network, layer by layer and filter by filter."""

    def __init__(self, napari_viewer) -> None:
        self.viewer = napari_viewer
        self.session, self.events = session_for(napari_viewer)
        self._make_controls(napari_viewer)
        self.runner = JobRunner()
        self.append(self.runner.progress)
        self.kernel_jobs = LatestJob("Kernels")
        self.view = None  # the KernelView shown
        self.shown = None  # the FilterShown shown
        self.rotations = None  # (axes, angles) per slice from the last dynamic run
        self._rotations_of = None  # the module they were predicted for
        self._maps = None  # (key, maps, zoom, source layer) from the last feature run
        # Kernel layers appear once the user asks (Show kernels, or picking a layer); from then
        # on a new model, layer, filter or angle updates them live.
        self.active = False
        self.show_button.changed.connect(self._activate)
        self.layer.changed.connect(self._layer_picked)
        for control in (self.output, self.input, self.mode, self.axis, self.angle):
            control.changed.connect(self.show_rotation)
        self.rotation_button.changed.connect(self.slice_rotations)
        self.feature_button.changed.connect(self.show_features)
        self.channel.changed.connect(self._show_channel)
        self.viewer.dims.events.current_step.connect(self._slice_moved)
        self.events.model_changed.connect(self._model_changed)
        if self.session.model3d is not None:
            self._model_changed()

    def _make_controls(self, viewer) -> None:
        self.image = LayerPicker(viewer, napari.layers.Image, "volume")
        self.layer = ComboBox(label="network layer", choices=self._layer_choices)
        self.show_button = PushButton(text="Show kernels")
        self.output = SpinBox(label="output channel", value=0, min=0, max=0,
                              tooltip="the filter to look at closely; the overview sorts filters by norm")
        self.input = ComboBox(label="input channel", choices=self._input_choices,
                              tooltip="one input's kernel of the filter, or the mean over its inputs")
        self.filter_numbers = Label(value="")
        self.filter_numbers.native.setStyleSheet("font-family: monospace; font-size: 9px")
        self.mode = ComboBox(label="rotation", choices=(DISPLAY, LEARNED), value=DISPLAY,
                             tooltip="rotate the filter by the sliders' axis and angle, or show the layer's "
                                     "learned rotation (dynamic layers: the current slice's)")
        self.axis = ComboBox(label="rotate about", choices=("d", "h", "w"), value="h",
                             tooltip="axis of the display rotation, (d, h, w) = (Z, Y, X)")
        self.angle = FloatSlider(label="angle (deg)", value=30.0, min=-180.0, max=180.0, step=1.0)
        self.rotation_info = Label(value="")
        self.rotation_button = PushButton(text="Rotation over the volume's slices")
        self.level = SpinBox(label="feature level", value=0, min=0, max=4)
        self.channel = Slider(label="channel", value=0, min=0, max=15)
        self.feature_button = PushButton(text="Show feature maps")
        self.status = Label(value="")
        for label in (self.rotation_info, self.status):
            label.native.setWordWrap(True)
        super().__init__(widgets=[
            self.image, self.layer, self.show_button, self.output, self.input, self.filter_numbers, self.mode,
            self.axis, self.angle, self.rotation_info, self.rotation_button, self.level, self.channel,
            self.feature_button, self.status,
        ])
        self.rotation_plot = CurvePlot("learned rotation angle per slice", bars=True)
        self.native.layout().insertWidget(11, self.rotation_plot)

    # -- which model, layer and filter ----------------------------------------------------
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

    def _input_choices(self, _widget=None):
        module = self.module() if self.session.model3d is not None else None
        inputs = module.in_channels // module.groups if module is not None else 0
        return [("mean over inputs", MEAN)] + [(str(i), i) for i in range(inputs)]

    def _activate(self, _=None) -> None:
        self.active = True
        self.show_layer()

    def _layer_picked(self, _=None) -> None:
        if self._resetting:
            return
        self._reset_filter_choices()
        self._activate()

    _resetting = False

    def _reset_filter_choices(self) -> None:
        module = self.module()
        self._resetting = True
        try:
            self.output.max = max(int(module.out_channels) - 1, 0) if module is not None else 0
            self.output.value = min(self.output.value, self.output.max)
            self.input.reset_choices()
            if self.input.value is None:
                self.input.value = MEAN
        finally:
            self._resetting = False

    def _model_changed(self, _model=None) -> None:
        self._resetting = True
        try:
            self.layer.reset_choices()
            if self.layer.choices and self.layer.value not in self.layer.choices:
                self.layer.value = self.layer.choices[0]
        finally:
            self._resetting = False
        self._reset_filter_choices()
        info = getattr(self.session.model3d, "feature_info", None) or []
        self.level.max = max(len(info) - 1, 0)
        self._maps = None
        self.rotations = self._rotations_of = None
        if self.active:
            self.show_layer()

    def module(self):
        model = self.source_model()
        if model is None or not self.layer.value:
            return None
        return dict(model.named_modules()).get(self.layer.value)

    # -- placing the inspector's own layers ----------------------------------------------
    def geometry(self) -> Geometry:
        source = self.image.value
        return Geometry.of(source, volume_data(source).shape if source is not None else ())

    # Layers are hidden, never removed, when a pick no longer needs them: napari's canvas runs a
    # full gc.collect() for each layer removed (300 ms with a model in memory, measured here).
    def _owned(self, role: str, rgb: bool | None = None):
        """This widget's layer for ``role`` (of that ``rgb``-ness when given; the visible one first)."""
        mine = [layer for layer in self.viewer.layers if layer.metadata.get(ROLE) == role
                and (rgb is None or bool(getattr(layer, "rgb", False)) == rgb)]
        mine.sort(key=lambda layer: not layer.visible)
        return mine[0] if mine else None

    def _hide(self, *roles: str) -> None:
        for layer in self.viewer.layers:
            if layer.metadata.get(ROLE) in roles and layer.visible:
                layer.visible = False

    def _put(self, role: str, data, frame, name: str, *, rgb: bool = False, **kwargs):
        """Show ``data`` in this widget's layer for ``role``: updated in place, or created."""
        scale, translate = frame
        for other in self.viewer.layers:  # e.g. the RGB overview when a grey one is shown
            if other.metadata.get(ROLE) == role and bool(getattr(other, "rgb", False)) != rgb and other.visible:
                other.visible = False
        layer = self._owned(role, rgb)
        if layer is None or layer.ndim != data.ndim - rgb:
            return self.viewer.add_image(data, rgb=rgb, scale=scale, translate=translate, name=name,
                                         metadata={ROLE: role}, **kwargs)
        # contrast limits first: data outside the old limits would be clipped in between
        if "contrast_limits" in kwargs:
            layer.contrast_limits = kwargs.pop("contrast_limits")
        layer.data = data
        if not (np.allclose(layer.scale, scale) and np.allclose(layer.translate, translate)):
            layer.scale, layer.translate = scale, translate
        for key, value in kwargs.items():
            if key != "colormap" or layer.colormap.name != value:
                setattr(layer, key, value)
        if layer.name != name:
            layer.name = name
        set_visible(layer, True)
        return layer

    # -- kernels, rotation, phase ---------------------------------------------------------
    def show_layer(self, _=None) -> None:
        """Show the picked layer's kernels (read afresh: weights may have changed) and the picked filter."""
        self._request_kernels(reuse=False)

    def show_rotation(self, _=None) -> None:
        """Show the picked filter and its rotation (the layer's kernels as already read)."""
        if self.active and not self._resetting:
            self._request_kernels(reuse=True)

    def _slice_moved(self, _=None) -> None:
        # only a dynamic layer's learned rotation depends on the slice
        if self.active and self.mode.value == LEARNED and self.rotations is not None:
            self._request_kernels(reuse=True)

    def _current_slice(self) -> int | None:
        source, rotations = self.image.value, self.rotations
        if source is None or rotations is None or volume_data(source).ndim != 3:
            return None
        z = float(source.world_to_data(self.viewer.dims.point)[-3])
        return int(np.clip(round(z), 0, len(rotations[1]) - 1))

    def request(self) -> FilterRequest:
        """The filter and rotation the controls ask for."""
        choice = self.input.value
        slice_rotvec = index = None
        if self.mode.value == LEARNED and self.rotations is not None and self._rotations_of is self.module():
            index = self._current_slice()
            if index is not None:
                axes, angles = self.rotations
                slice_rotvec = tuple(float(v) for v in axes[index] * angles[index])
        return FilterRequest(int(self.output.value), None if choice in (None, MEAN) else int(choice), self.axis.value,
                             math.radians(self.angle.value), self.mode.value == LEARNED, slice_rotvec, index)

    def _request_kernels(self, reuse: bool) -> None:
        module = self.module()
        if module is None:
            return
        view = self.view if reuse and self.view is not None and self.view.module is module else None
        name, request = self.layer.value, self.request()
        self.kernel_jobs.submit(lambda: kernel_view_job(module, name, request, view), self._show_kernels)

    def _show_kernels(self, result):
        """Show a kernel job's result, one layer per turn of the event loop (see ``_jobs``)."""
        view, shown = result
        before_view, before = self.view, self.shown
        self.view, self.shown = view, shown
        self.rotation_info.value = self._rotation_text(view, shown)
        self.rotation_button.enabled = view.learned.kind == "dynamic"
        new_layer = before_view is not view or self._owned(OVERVIEW) is None
        if new_layer:
            yield self._show_overview(view)
        picked = (shown.request.output, shown.request.input)
        if new_layer or before is None or (before.request.output, before.request.input) != picked:
            yield self._show_outline(view, shown.request)
        strip = self._show_filter(view, shown)
        yield strip
        if not strip.colorbar.visible:  # its own step: the first colour bar builds its text visuals
            strip.colorbar.visible = True
            yield strip
        yield from self._show_rotation(view, shown)

    def _show_overview(self, view) -> None:
        grid = view.grid
        frame = self.geometry().overview(grid.data.shape)
        colours = {"contrast_limits": (0.0, 1.0)} if grid.rgb else {"colormap": KERNEL_MAP,
                                                                    "contrast_limits": (-1.0, 1.0)}
        shown = f"{grid.shown[0]} of {view.shape[0]}" if grid.shown[0] < view.shape[0] else f"all {view.shape[0]}"
        name = f"{view.name}: {shown} filters by norm, each scaled to its peak"
        self._put(OVERVIEW, grid.data, frame, name, rgb=grid.rgb, **colours)

    def _show_outline(self, view, request) -> None:
        frame = self.geometry().overview(view.grid.data.shape)
        grid, position = view.grid, view.overview_position(min(request.output, view.shape[0] - 1))
        if position is None:  # not among the filters drawn
            self._hide(OUTLINE)
            return
        if grid.layout == "out_x_in":
            row, col, width = position, (request.input or 0), grid.tile[1]
            if request.input is None or request.input >= grid.shown[1]:  # the whole filter: its row
                col, width = 0, grid.data.shape[2]
        else:
            row, col, width = position // grid.cols, position % grid.cols, grid.tile[1]
        (_, sy, sx), (_, ty, tx) = frame
        y, x = grid.tile_origin(row, col)
        corners = np.array([[ty + (y - 0.5) * sy, tx + (x - 0.5) * sx],
                            [ty + (y + grid.tile[0] - 0.5) * sy, tx + (x + width - 0.5) * sx]])
        name, layer = f"{view.name}: picked filter o{request.output}", self._owned(OUTLINE)
        if layer is not None:  # the data setter keeps the rectangle's type and colours
            layer.data = [corners]
            if layer.name != name:
                layer.name = name
            if not np.isclose(layer.edge_width[0], 0.4 * sy):
                layer.edge_width = 0.4 * sy
            set_visible(layer, True)
            return
        self.viewer.add_shapes([corners], shape_type="rectangle", edge_color="yellow", face_color="transparent",
                               edge_width=0.4 * sy, name=name, metadata={ROLE: OUTLINE})

    def _filter_name(self, view, request) -> str:
        which = "mean over inputs" if request.input is None else f"i{request.input}"
        return f"{view.name} o{request.output} {which}"

    def _limit(self, shown) -> float:
        """The one symmetric colour limit of the picked filter and its rotation panels."""
        # torch on first use: npe2 imports the widget modules before any model is loaded
        from napari_crossd.models.inspect import symmetric_limit

        rotation = shown.rotation
        return symmetric_limit(shown.values, *(() if rotation is None else (rotation.u, rotation.rotated)))

    def _show_filter(self, view, shown) -> None:
        # torch on first use: npe2 imports the widget modules before any model is loaded
        from napari_crossd.models.inspect import depth_strip

        values, limit = shown.values, self._limit(shown)
        k = max(values.shape)
        frame = self.geometry().panel(k, 0, depth=False)
        name = f"{self._filter_name(view, shown.request)}: depth slices d=0..{values.shape[0] - 1} side by side"
        self.filter_numbers.value = numbers_text(values)
        self.status.value = (f"{view.name}: kernels {view.shape}; filter o{shown.request.output}: max |w| "
                             f"{float(np.abs(values).max()):.3g}; colour limits +-{limit:.3g} (filter and rotation)")
        return self._put(FILTER, depth_strip(values), frame, name, colormap=KERNEL_MAP,
                         contrast_limits=(-limit, limit))

    def _show_rotation(self, view, shown):
        """Generator: the rotation panels, the phase and the amplitude, one layer per step."""
        # torch on first use: npe2 imports the widget modules before any model is loaded
        from napari_crossd.models.inspect import PHASE_FLOOR, side_by_side

        rotation = shown.rotation
        if rotation is None:
            self._hide(ROTATION, PHASE, AMPLITUDE)
            return
        k, limit = rotation.u.shape[0], self._limit(shown)
        applied = np.broadcast_to(rotation.applied, rotation.u.shape)
        panels = side_by_side(rotation.u, rotation.rotated, applied)
        geometry, base = self.geometry(), self._filter_name(view, shown.request)
        yield self._put(ROTATION, panels, geometry.panel(k, 1),
                        f"{base}: U | rotated U | applied 2D kernel (d={k // 2})", colormap=KERNEL_MAP,
                        contrast_limits=(-limit, limit))
        phase = self._put(PHASE, shown.phase, geometry.panel(k, 2),
                          f"{base}: phase shift (deg), masked below {PHASE_FLOOR:.0%} amplitude",
                          colormap="twilight_shifted", contrast_limits=(-180.0, 180.0))
        yield phase
        if not phase.colorbar.visible:
            phase.colorbar.visible = True
            yield phase
        yield self._put(AMPLITUDE, shown.amplitude, geometry.panel(k, 2, 1), f"{base}: |FFT3(U)| / max",
                        colormap="gray", contrast_limits=(0.0, 1.0))

    def _rotation_text(self, view, shown) -> str:
        text = view.learned.describe()
        learned = view.learned
        if learned.kind == "static" and len(learned.angle) > 1:
            o = shown.request.output
            d, h, w = learned.axis[o]
            text += f"; o{o}: {math.degrees(learned.angle[o]):.2f} deg about ({d:.3f}, {h:.3f}, {w:.3f})"
        if shown.rotation is not None:
            text += f"\nshown: {shown.what}, {shown.rotation.describe()}"
        return text

    # -- dynamic rotation over the volume -------------------------------------------------
    def _net_input(self, layer):
        # torch on first use: npe2 imports the widget modules before any model is loaded
        from napari_crossd.engine.normalize import network_volume

        return network_volume(volume_data(layer), self.session.model3d)

    def slice_rotations(self, _=None):
        """Predict the picked dynamic layer's rotation for every slice of the volume (a worker)."""
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

        return self.runner.start(job, lambda result: self._show_slice_rotations(module, name, layer, result),
                                 "Slice rotations")

    def _show_slice_rotations(self, module, name: str, source, result) -> None:
        axes, angles = result
        self.rotations, self._rotations_of = (axes, angles), module
        degrees = np.degrees(angles)
        self._show_histogram(name, degrees)
        mean_axis = axes.mean(0)
        self.rotation_info.value = (
            f"dynamic rotation over {len(angles)} slices: angle {degrees.mean():.2f} +- {degrees.std():.2f} deg "
            f"(min {degrees.min():.2f}, max {degrees.max():.2f}); mean axis (d, h, w) "
            f"({mean_axis[0]:.2f}, {mean_axis[1]:.2f}, {mean_axis[2]:.2f}); axes as a Vectors layer (3D view)"
        )
        # one arrow per slice, from the slice's centre: in 2D the dims slider shows each slice's own
        geometry = self.geometry()
        centre = np.asarray(geometry.origin) + np.asarray(geometry.extent) / 2
        starts = np.repeat(centre[None], len(angles), axis=0)
        starts[:, 0] = source.data_to_world((0, 0, 0))[-3] + np.arange(len(angles)) * source.scale[-3]
        length = 0.4 * min(geometry.extent[1:])
        vectors = np.stack([starts, axes * length], axis=1)
        limits = (float(degrees.min()), float(max(degrees.max(), degrees.min() + 1e-3)))
        name = f"{name}: learned rotation axis per slice ({len(angles)})"
        layer = self._owned(AXES)
        if layer is not None:
            layer.data, layer.features, layer.name = vectors, {"angle (deg)": degrees}, name
            set_visible(layer, True)
            layer.edge_contrast_limits, layer.edge_color = limits, "angle (deg)"
            return self._after_slice_rotations()
        self.viewer.add_vectors(vectors, features={"angle (deg)": degrees}, edge_color="angle (deg)",
                                edge_colormap="viridis", edge_contrast_limits=limits,
                                edge_width=0.06 * length, vector_style="arrow", name=name, metadata={ROLE: AXES},
                                blending="translucent_no_depth")  # drawn over the volume in 3D
        return self._after_slice_rotations()

    def _after_slice_rotations(self) -> None:
        if self.active and self.mode.value == LEARNED:
            self._request_kernels(reuse=True)

    def _show_histogram(self, name: str, degrees: np.ndarray) -> None:
        low, high = np.floor(degrees.min()), np.ceil(degrees.max())
        high = max(high, low + 1.0)
        counts, edges = np.histogram(degrees, bins=HISTOGRAM_BINS, range=(low, high))
        width = (high - low) / HISTOGRAM_BINS
        self.rotation_plot.title = f"{name}: learned angle over {len(degrees)} slices ({width:.3g} deg bins)"
        self.rotation_plot.y_label = "slices"
        middle = f"{(low + high) / 2:.1f} deg"
        self.rotation_plot.set_values(counts, (f"{edges[0]:.0f} deg", middle, f"{edges[-1]:.0f} deg"))

    # -- feature maps ---------------------------------------------------------------------
    def show_features(self, _=None):
        """Compute the feature maps of the chosen level on the volume (a worker), then show a channel."""
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
        stride = " x ".join(f"{z:g}" for z in zoom)
        name = f"feature map level {level} channel {channel} (stride {stride}) over {source.name}"
        self._put(FEATURE, data, (tuple(scale), tuple(translate)), name, colormap="inferno", opacity=0.6,
                  blending="additive", contrast_limits=(low, high if high > low else low + 1))
        self.status.value = (f"feature map level {level} channel {channel}: {tuple(data.shape)}, stride {stride}, "
                             f"values {low:.3g} .. {high:.3g}")
