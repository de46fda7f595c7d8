"""What the Inspector computes for one request (in its worker) and where its layers go.

No Qt here and no torch at import: :func:`kernel_view_job` imports the numerics
(:mod:`napari_crossd.models.inspect`) when it first runs, in the worker thread.

Placement (world coordinates, beside the volume being inspected, whose extent is
(Z, Y, X) = ``extent`` from ``origin``):

* the overview grid of the whole layer: right of the volume, in a box of the volume's size;
  its k kernel slices span the volume's Z extent, so the dims slider steps through kernel
  depth while it steps through the volume;
* right of it, a column of magnified panels (each kernel voxel a square of ``cell`` world
  units, about a fifteenth of the volume's height): the picked filter's depth slices side by
  side; U | rotated U | the applied 2D kernel; phase shift | amplitude.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only
    import torch
    from torch import nn

    from napari_crossd.models.inspect import FilterRotation, KernelGrid, LearnedRotation

__all__ = ["FilterRequest", "FilterShown", "Geometry", "KernelView", "kernel_view_job", "numbers_text"]

MAX_OUT, MAX_IN = 32, 16


@dataclass(frozen=True)
class KernelView:
    """One network layer's kernels as read once (reused while only the pick or angle changes).

    Attributes:
        module: the network layer; name: its name in the model.
        shape: its whole kernel bank's shape.
        bank: the 3D kernels its 3D forward applies (C_out, C_in / groups, k, k, k);
            u: its kernels before any learned rotation (a CrossDConv's U).
        grid: the overview (filters sorted by norm, each scaled to its own peak);
            order: output channel of each overview row (or tile).
        learned: the layer's learned rotation.
    """

    module: nn.Module
    name: str
    shape: tuple[int, ...]
    bank: torch.Tensor
    u: torch.Tensor
    grid: KernelGrid
    order: np.ndarray
    learned: LearnedRotation

    def overview_position(self, output: int) -> int | None:
        """Row (or tile) of ``output`` in the overview; None when it is not drawn."""
        drawn = self.order[: self.grid.shown[0]]
        hits = np.nonzero(drawn == output)[0]
        return int(hits[0]) if len(hits) else None


@dataclass(frozen=True)
class FilterRequest:
    """What to show: filter (output, input or None = mean over inputs) and the rotation.

    ``learned``: show the layer's learned rotation (static: its own, per output channel if it
    has one per channel; dynamic: ``slice_rotvec``, the rotation it predicts for the current
    slice) instead of ``axis`` / ``angle`` (radians).
    """

    output: int
    input: int | None
    axis: str
    angle: float
    learned: bool = False
    slice_rotvec: tuple[float, float, float] | None = None
    slice_index: int | None = None


@dataclass(frozen=True)
class FilterShown:
    """The picked filter: its values (from the model's kernels), rotation and spectrum.

    ``values``: (k, k, k) ``bank[output, input]`` (or the mean over inputs);
    ``rotation``: None for kernels that are not cubic; ``phase`` (degrees, NaN where the
    amplitude is below ``PHASE_FLOOR``) and ``amplitude`` (k, k, k); ``what``: the rotation in words.
    """

    request: FilterRequest
    values: np.ndarray
    rotation: FilterRotation | None
    phase: np.ndarray | None
    amplitude: np.ndarray | None
    what: str


def _read_layer(module, name: str) -> KernelView:
    # torch on first use, in the worker: npe2 imports the widget modules before any model is loaded
    from napari_crossd.models.inspect import filter_overview, layer_kernels, layer_u, learned_rotation

    bank = layer_kernels(module)
    grid, order = filter_overview(bank, max_out=MAX_OUT, max_in=MAX_IN)
    return KernelView(module, name, tuple(bank.shape), bank, layer_u(module), grid, order, learned_rotation(module))


def _rotation_for(request: FilterRequest, view: KernelView) -> tuple[np.ndarray, str]:
    """(rotvec, words) of the rotation the request asks for."""
    learned = view.learned
    if request.learned and learned.kind == "static":
        index = request.output if len(learned.angle) > 1 else 0
        return learned.axis[index] * learned.angle[index], "learned static rotation"
    if request.learned and learned.kind == "dynamic" and request.slice_rotvec is not None:
        return np.asarray(request.slice_rotvec), f"learned rotation predicted for slice {request.slice_index}"
    names = {"d": (1.0, 0.0, 0.0), "h": (0.0, 1.0, 0.0), "w": (0.0, 0.0, 1.0)}
    note = ""
    if request.learned:
        note = (" (no learned rotation here" if learned.kind == "none" else
                " (press 'Rotation over the volume's slices' for the learned ones")
        note += ": showing the axis and angle below)"
    return np.asarray(names[request.axis]) * request.angle, "display rotation" + note


def kernel_view_job(module, name: str, request: FilterRequest, shown: KernelView | None = None):
    """Generator (worker thread): ``module``'s kernels and the picked filter, rotated.

    ``shown``: this module's :class:`KernelView` already computed, reused instead of read again.

    Returns:
        (view, filter): a :class:`KernelView` and a :class:`FilterShown`.
    """
    # torch on first use, in the worker: npe2 imports the widget modules before any model is loaded
    from napari_crossd.engine import Progress
    from napari_crossd.models.inspect import filter_spectrum, pick_filter, rotate_filter

    view = shown
    if view is None:
        yield Progress(0, 3, f"kernels of {name}")
        view = _read_layer(module, name)
    output = min(max(int(request.output), 0), view.shape[0] - 1)
    inputs = None if request.input is None else min(max(int(request.input), 0), view.shape[1] - 1)
    values = pick_filter(view.bank, output, inputs)
    if len(set(values.shape)) != 1:
        return view, FilterShown(request, values, None, None, None, "a 2D layer: nothing to rotate")
    rotvec, what = _rotation_for(request, view)
    yield Progress(1, 3, f"rotating by {math.degrees(float(np.linalg.norm(rotvec))):.0f} deg")
    rotation = rotate_filter(pick_filter(view.u, output, inputs), rotvec)
    yield Progress(2, 3, "phase shift")
    phase, amplitude = filter_spectrum(rotation.u, rotation.rotated)
    return view, FilterShown(request, values, rotation, phase, amplitude, what)


def numbers_text(kernel: np.ndarray, digits: int = 3) -> str:
    """A (k_d, k_h, k_w) kernel's values as text, one block per depth slice (side by side when they fit)."""
    width = digits + 3
    blocks = []
    for d, plane in enumerate(kernel):
        rows = [" ".join(f"{v:+.{digits}f}".rjust(width) for v in row) for row in plane]
        head = f"d={d}".ljust(len(rows[0]))
        blocks.append([head, *rows])
    if len(blocks) * (len(blocks[0][0]) + 2) <= 72:
        return "\n".join("  ".join(parts) for parts in zip(*blocks, strict=True))
    return "\n".join(line for block in blocks for line in block)


@dataclass(frozen=True)
class Geometry:
    """Where the inspector's layers sit in world coordinates (see the module docstring).

    origin: (Z, Y, X) world position of the volume's first voxel corner; extent: its size.
    """

    origin: tuple[float, float, float]
    extent: tuple[float, float, float]

    @classmethod
    def of(cls, layer, data_shape) -> Geometry:
        """The geometry of an Image layer (or a 64-unit cube when there is no 3D volume)."""
        if layer is None or len(data_shape) < 3 or getattr(layer, "rgb", False):
            return cls((0.0, 0.0, 0.0), (64.0, 64.0, 64.0))
        scale = np.asarray(layer.scale[-3:], dtype=float)
        corner = np.asarray(layer.translate[-3:], dtype=float) - scale / 2
        extent = np.asarray(data_shape[-3:], dtype=float) * scale
        return cls(tuple(float(v) for v in corner), tuple(float(v) for v in extent))

    def overview(self, grid_shape) -> tuple[tuple, tuple]:
        """(scale, translate) of a (k, H, W) overview grid: right of the volume, in its box."""
        depth, height, width = grid_shape[:3]
        z = self.extent[0] / depth
        pixel = float(min(self.extent[1] / height, self.extent[2] / width))
        corner = (self.origin[0], self.origin[1], self.origin[2] + 1.05 * self.extent[2])
        return (z, pixel, pixel), (corner[0] + z / 2, corner[1] + pixel / 2, corner[2] + pixel / 2)

    def cell(self, k: int) -> float:
        """World size of one magnified kernel voxel: three rows of panels fill the volume's height."""
        return self.extent[1] / (3 * (k + 2))

    def panel(self, k: int, row: int, column: int = 0, *, depth: bool = True) -> tuple[tuple, tuple]:
        """(scale, translate) of a magnified panel in ``row`` 0..2 of the column right of the overview.

        ``column`` counts panels of width k + 2 cells; ``depth``: a (k, h, w) layer whose k slices
        span the volume's Z extent (else a 2D layer).
        """
        cell = self.cell(k)
        y = self.origin[1] + row * (k + 2) * cell + cell / 2
        x = self.origin[2] + 2.15 * self.extent[2] + column * (k + 2) * cell + cell / 2
        if not depth:
            return (cell, cell), (y, x)
        z = self.extent[0] / k
        return (z, cell, cell), (self.origin[0] + z / 2, y, x)
