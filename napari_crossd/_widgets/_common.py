"""Small pieces the dock widgets share: layer pickers, input checks, result-layer geometry."""

from __future__ import annotations

import numpy as np
from magicgui.widgets import ComboBox

__all__ = ["LayerPicker", "check_volume_layer", "derived_kwargs", "set_visible", "volume_data"]


class LayerPicker(ComboBox):
    """A ComboBox of the viewer's layers of one type, kept up to date as layers come and go."""

    def __init__(self, viewer, layer_type, label: str, **kwargs) -> None:
        self._viewer = viewer
        self._layer_type = layer_type
        super().__init__(label=label, choices=self._choices, nullable=True, **kwargs)
        events = viewer.layers.events
        for name in ("inserted", "removed", "reordered"):
            getattr(events, name).connect(self._refresh)
        self._refresh()

    def _choices(self, _widget=None):
        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, self._layer_type)]

    def _refresh(self, _event=None) -> None:
        current = self.value
        self.reset_choices()
        layers = [layer for _, layer in self._choices()]
        if current in layers:
            self.value = current
        elif layers:
            self.value = layers[-1]


def volume_data(layer):
    """The full-resolution data of a layer (level 0 of a multiscale layer)."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def check_volume_layer(layer, what: str = "This needs") -> None:
    """ValueError with the reason when ``layer`` is not a single-channel 3D volume."""
    if layer is None:
        raise ValueError(f"{what} an Image layer: open a volume first (File > Open, or File > Open Sample)")
    if getattr(layer, "rgb", False):
        raise ValueError(
            f"layer {layer.name!r} is RGB with shape {tuple(volume_data(layer).shape)}: the network reads "
            "single-channel volumes; split the channels (right-click > Split RGB) and pick one"
        )
    ndim = volume_data(layer).ndim
    if ndim != 3:
        raise ValueError(
            f"layer {layer.name!r} is {ndim}D with shape {tuple(volume_data(layer).shape)}: "
            "a 3D (Z, Y, X) volume is needed"
        )


def derived_kwargs(source, name: str, *, leading: int = 0, zoom=None) -> dict:
    """kwargs for a new layer on ``source``'s grid: its scale, translate and NIfTI metadata.

    Args:
        source: the layer the result was computed from.
        name: the new layer's name.
        leading: extra leading axes of the new data (e.g. 1 for a (C, Z, Y, X) stack).
        zoom: source voxels per result voxel along (Z, Y, X) for results on a coarser
            grid; the result's voxel centres are placed where they belong.
    """
    scale = np.asarray(source.scale[-3:], dtype=float)
    translate = np.asarray(source.translate[-3:], dtype=float)
    if zoom is not None:
        zoom = np.asarray(zoom, dtype=float)
        translate = translate + (zoom - 1) / 2 * scale
        scale = scale * zoom
    metadata = {}
    if "nifti" in source.metadata and zoom is None:
        metadata["nifti"] = source.metadata["nifti"]
    metadata["source_layer"] = source.name
    return {
        "name": name,
        "scale": (1.0,) * leading + tuple(scale),
        "translate": (0.0,) * leading + tuple(translate),
        "metadata": metadata,
    }


def set_visible(layer, visible: bool) -> None:
    """``layer.visible = visible`` only where it changes anything."""
    # napari's setter does not compare: visible = True on a visible layer refreshes it and makes the
    # viewer recompute every layer's extent and the canvas its overlays (25 ms a call, measured)
    if layer.visible != visible:
        layer.visible = visible
