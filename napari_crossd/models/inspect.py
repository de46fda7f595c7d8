"""What a network's convolutions hold and do: the numerics of the napari inspector. No Qt.

Axis order: kernels (C_out, C_in / groups, d, h, w) as :mod:`napari_crossd.core`;
rotation vectors are axis-angle in radians, (d, h, w) order; volumes (Z, Y, X) with
Z = d. Grids are laid out for display: one k x k tile per kernel, slice d of every tile
in plane d of the grid, so napari's dims slider steps through the kernels' depth.

* :func:`conv_layers`, :func:`layer_kernels`: the synthesized 3D kernel bank of a layer
  (a Conv3d's weight, a CrossDConv's U rotated by its static rotation, a Conv2d's W as a
  one-slice kernel).
* :func:`kernel_grid`: the bank as an image, (output x input) tiles, or the output
  kernels tiled in colour when the layer reads 3 channels (the first layer of an
  ImageNet network), or tiled in grey for depthwise layers.
* :func:`rotate_bank`, :func:`phase_shift`: the bank rotated exactly (Fourier shears) and
  the phase that rotation adds to its spectrum: ``angle(FFT3(rotated U)) - angle(FFT3(U))``.
* :func:`learned_rotation`, :func:`dynamic_rotations`: a CrossDConv's learned static
  rotation (axis, angle), or the per-slice rotation its dynamic head predicts for the 2D
  slices of a volume.
* :func:`feature_maps`: a backbone level's feature maps on a volume, at the level's own
  resolution, with the zoom back to the volume's grid.
* :func:`input_channels`: what the network's first convolution reads.
* One filter closely: :func:`filter_overview` (the layer's filters sorted by norm, each
  scaled to its own peak), :func:`pick_filter`, :func:`depth_strip` (its depth slices side
  by side), :func:`rotate_filter` (U, rotated U and the 2D kernel a 2D forward applies),
  :func:`filter_spectrum` (phase shift in degrees, masked where the spectrum has no energy,
  and the amplitude).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..core import CrossDConv, rotate_kernels, static_kernels

__all__ = [
    "PHASE_FLOOR",
    "FilterRotation",
    "KernelGrid",
    "LearnedRotation",
    "conv_layers",
    "depth_strip",
    "dynamic_rotations",
    "feature_maps",
    "filter_overview",
    "filter_spectrum",
    "input_channels",
    "kernel_grid",
    "layer_kernels",
    "layer_u",
    "learned_rotation",
    "norm_order",
    "phase_shift",
    "pick_filter",
    "rotate_bank",
    "rotate_filter",
    "side_by_side",
    "symmetric_limit",
]

_CONVS = (nn.Conv2d, nn.Conv3d)  # CrossDConv is an nn.Conv2d


def conv_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Convolutions with a spatial kernel (larger than 1 tap along some axis), in forward order.

    CrossDConv layers' internal rotation heads are 1x1 convolutions and so left out.
    """
    return {name: module for name, module in model.named_modules()
            if isinstance(module, _CONVS) and max(module.kernel_size) > 1}


def input_channels(model: nn.Module) -> int:
    """Input channels of the network's first convolution."""
    for module in model.modules():
        if isinstance(module, _CONVS):
            return module.in_channels
    raise ValueError("The model has no convolution: cannot tell how many input channels it takes.")


def layer_kernels(module: nn.Module) -> torch.Tensor:
    """The 3D kernel bank a layer applies to volumes: (C_out, C_in / groups, k_d, k_h, k_w), float32.

    * ``CrossDConv``: U padded to its kernel support and rotated by its static rotation
      (the kernel of its 3D forward); a dynamic layer's 3D forward uses U as it is.
    * ``Conv3d``: its weight. ``Conv2d``: its weight as a one-slice kernel (k_d = 1).
    """
    with torch.no_grad():
        if isinstance(module, CrossDConv):
            rotation = module.rotation_vector.detach().float() if module.rotation == "static" else None
            kernels = static_kernels(module.weights_3d.detach().float(), rotation, support=module.kernel_support)
            return kernels.cpu()
        if isinstance(module, nn.Conv3d):
            return module.weight.detach().float().cpu()
        if isinstance(module, nn.Conv2d):
            return module.weight.detach().float().cpu().unsqueeze(2)
    raise ValueError(f"expected a Conv2d, Conv3d or CrossDConv layer; got {type(module).__name__}")


@dataclass(frozen=True)
class KernelGrid:
    """A kernel bank laid out for display.

    Attributes:
        data: (k_d, H, W) signed float32 scaled so that max |w| = 1, or (k_d, H, W, 3) RGB
            in [0, 1] (0.5 = zero weight) when ``rgb``.
        rgb: whether ``data`` is colour.
        rows, cols: tiles along H and W.
        tile: (k_h, k_w) of each tile; tiles are ``gap`` pixels apart.
        layout: ``"out_x_in"`` (row o, column i holds kernel (o, i)) or ``"tiles"``
            (output kernels in reading order, row-major).
        shown: (outputs, inputs) drawn; the bank may have more (``max_out``, ``max_in``).
        peak: max |w| over the drawn kernels, the unit of ``data``.
    """

    data: np.ndarray
    rgb: bool
    rows: int
    cols: int
    tile: tuple[int, int]
    gap: int
    layout: str
    shown: tuple[int, int]
    peak: float

    def tile_origin(self, row: int, col: int) -> tuple[int, int]:
        """(y, x) of the top-left pixel of a tile."""
        return row * (self.tile[0] + self.gap), col * (self.tile[1] + self.gap)


def kernel_grid(
    kernels: torch.Tensor | np.ndarray,
    *,
    max_out: int = 32,
    max_in: int = 16,
    gap: int = 1,
    rgb: bool | None = None,
) -> KernelGrid:
    """Lay a kernel bank (C_out, C_in, k_d, k_h, k_w) out as one image per kernel slice.

    Args:
        kernels: the bank, e.g. from :func:`layer_kernels` or :func:`rotate_bank`.
        max_out, max_in: the first this many output and input channels are drawn.
        gap: pixels between tiles (zero weight: 0 in grey, 0.5 in colour).
        rgb: colour tiles of the 3 input channels; default: when C_in is 3.

    Returns:
        A :class:`KernelGrid`. Grey grids lay kernel (o, i) at row o, column i; banks with
        one input channel per group (depthwise) and colour grids tile the output kernels
        row-major in a near-square grid.
    """
    bank = torch.as_tensor(kernels).detach().float().cpu()
    if bank.ndim != 5:
        raise ValueError(f"kernels must be (C_out, C_in, k_d, k_h, k_w); got shape {tuple(bank.shape)}")
    if max_out < 1 or max_in < 1 or gap < 0:
        raise ValueError(f"max_out and max_in must be >= 1 and gap >= 0; got {max_out}, {max_in}, {gap}")
    if rgb is None:
        rgb = bank.shape[1] == 3
    if rgb and bank.shape[1] != 3:
        raise ValueError(f"colour kernels need 3 input channels; this bank has {bank.shape[1]}")
    bank = bank[:max_out] if rgb else bank[:max_out, :max_in]
    outputs, inputs, depth, kh, kw = bank.shape
    peak = float(bank.abs().max())
    unit = bank / peak if peak > 0 else bank
    if rgb or inputs == 1:
        cols = math.ceil(math.sqrt(outputs))
        rows = math.ceil(outputs / cols)
        layout = "tiles"
        positions = [(o // cols, o % cols) for o in range(outputs)]
    else:
        rows, cols, layout = outputs, inputs, "out_x_in"
        positions = None
    height, width = rows * (kh + gap) - gap, cols * (kw + gap) - gap
    if rgb:
        data = np.full((depth, height, width, 3), 0.5, dtype=np.float32)
        tiles = (0.5 + 0.5 * unit).permute(0, 2, 3, 4, 1).numpy()  # (O, d, h, w, 3)
        for o, (r, c) in enumerate(positions):
            y, x = r * (kh + gap), c * (kw + gap)
            data[:, y : y + kh, x : x + kw] = tiles[o]
    else:
        data = np.zeros((depth, height, width), dtype=np.float32)
        tiles = unit.numpy()
        if positions is not None:
            for o, (r, c) in enumerate(positions):
                y, x = r * (kh + gap), c * (kw + gap)
                data[:, y : y + kh, x : x + kw] = tiles[o, 0]
        else:
            # (O, I, d, h, w) -> (d, O, h, I, w) with the gaps, in one strided assignment.
            padded = np.zeros((outputs, inputs, depth, kh + gap, kw + gap), dtype=np.float32)
            padded[..., :kh, :kw] = tiles
            full = padded.transpose(2, 0, 3, 1, 4).reshape(depth, outputs * (kh + gap), inputs * (kw + gap))
            data = np.ascontiguousarray(full[:, :height, :width])
    return KernelGrid(data, bool(rgb), rows, cols, (kh, kw), gap, layout, (outputs, inputs if not rgb else 3), peak)


def _rotvec(axis: torch.Tensor | np.ndarray | tuple | str, angle: float) -> torch.Tensor:
    names = {"d": (1.0, 0.0, 0.0), "z": (1.0, 0.0, 0.0), "h": (0.0, 1.0, 0.0), "y": (0.0, 1.0, 0.0),
             "w": (0.0, 0.0, 1.0), "x": (0.0, 0.0, 1.0)}
    if isinstance(axis, str):
        if axis not in names:
            raise ValueError(f"axis must be one of {sorted(names)} or a 3-vector; got {axis!r}")
        axis = names[axis]
    vector = torch.as_tensor(np.asarray(axis, dtype=np.float64)).reshape(-1)
    if vector.numel() != 3 or float(vector.norm()) == 0:
        raise ValueError(f"axis must be a non-zero 3-vector in (d, h, w) order; got {axis!r}")
    return (vector / vector.norm() * float(angle)).reshape(1, 3)


def rotate_bank(kernels: torch.Tensor, axis, angle: float, support: int | None = None) -> torch.Tensor:
    """A kernel bank (C_out, C_in, k, k, k) rotated by ``angle`` radians about ``axis`` exactly.

    Args:
        kernels: cubic kernels (a one-slice Conv2d kernel has nothing to rotate: ValueError).
        axis: ``"d"``/``"z"``, ``"h"``/``"y"``, ``"w"``/``"x"`` or a 3-vector in (d, h, w) order.
        angle: radians.
        support: optional odd size >= k to zero-pad to first (keeps big turns from wrapping).
    """
    if len(set(kernels.shape[-3:])) != 1:
        raise ValueError(
            f"only cubic k x k x k kernels rotate; this layer's kernels are {tuple(kernels.shape[-3:])} "
            "(a 2D layer: inflate the model, or pick a Cross-D layer)"
        )
    rotvec = _rotvec(axis, angle).to(torch.float64)
    return rotate_kernels(kernels.detach().to(torch.float64), rotvec, support)[0].to(kernels.dtype)


def phase_shift(kernels: torch.Tensor, rotated: torch.Tensor, *, floor: float = 1e-6) -> np.ndarray:
    """``angle(FFT3(rotated)) - angle(FFT3(kernels))`` per kernel, wrapped to (-pi, pi].

    Frequencies are centred (``fftshift``: zero frequency at index k // 2), so the result
    lays out like the kernels. Where either spectrum's magnitude is below ``floor`` times
    that kernel's largest magnitude the phase is undefined and reported as 0.

    Args:
        kernels: U, (..., k, k, k).
        rotated: the rotated U, same shape (e.g. :func:`rotate_bank`).

    Returns:
        float32 array of the same shape.
    """
    if kernels.shape != rotated.shape:
        raise ValueError(f"kernels {tuple(kernels.shape)} and rotated {tuple(rotated.shape)} differ in shape")
    dims = (-3, -2, -1)
    spectrum = torch.fft.fftn(kernels.detach().to(torch.float64), dim=dims)
    turned = torch.fft.fftn(rotated.detach().to(torch.float64), dim=dims)
    difference = torch.angle(turned * spectrum.conj())  # the wrapped difference of the two phases
    scale = torch.maximum(spectrum.abs().amax(dim=dims, keepdim=True), turned.abs().amax(dim=dims, keepdim=True))
    defined = (spectrum.abs() > floor * scale) & (turned.abs() > floor * scale)
    difference = torch.where(defined, difference, torch.zeros_like(difference))
    return torch.fft.fftshift(difference, dim=dims).float().numpy()


@dataclass(frozen=True)
class LearnedRotation:
    """A layer's learned rotation.

    Attributes:
        kind: ``"none"`` (plain convolution or a Cross-D layer without rotation),
            ``"static"`` (learned per layer or per output channel) or ``"dynamic"``
            (predicted per input: see :func:`dynamic_rotations`).
        axis: (R, 3) unit axes, (d, h, w) order (zeros where the angle is 0); R = 0 for
            ``"none"`` and ``"dynamic"``.
        angle: (R,) radians.
    """

    kind: str
    axis: np.ndarray
    angle: np.ndarray

    def describe(self) -> str:
        if self.kind == "none":
            return "no learned rotation (plain convolution)"
        if self.kind == "dynamic":
            return "dynamic rotation: predicted per slice (see the distribution over the volume)"
        degrees = np.degrees(self.angle)
        if len(self.angle) == 1:
            d, h, w = self.axis[0]
            return f"static rotation: {degrees[0]:.2f} deg about (d, h, w) = ({d:.3f}, {h:.3f}, {w:.3f})"
        return (f"static rotation per output channel ({len(self.angle)}): angle {degrees.min():.2f} .. "
                f"{degrees.max():.2f} deg, mean {degrees.mean():.2f} deg")


def learned_rotation(module: nn.Module) -> LearnedRotation:
    """The rotation a layer learned (``"none"`` for anything but a rotating CrossDConv)."""
    empty = np.zeros((0, 3), dtype=np.float64)
    if not isinstance(module, CrossDConv) or module.rotation == "none":
        return LearnedRotation("none", empty, np.zeros(0))
    if module.rotation == "dynamic":
        return LearnedRotation("dynamic", empty, np.zeros(0))
    vectors = module.rotation_vector.detach().to(torch.float64).cpu().numpy()
    angles = np.linalg.norm(vectors, axis=1)
    axes = np.divide(vectors, angles[:, None], out=np.zeros_like(vectors), where=angles[:, None] > 0)
    return LearnedRotation("static", axes, angles)


class _Stop(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward is not computed."""


def _run_until(model: nn.Module, module: nn.Module, x: torch.Tensor, *, want_input: bool) -> torch.Tensor:
    captured: list[torch.Tensor] = []

    def hook(_module, args, output):
        captured.append(args[0] if want_input else output)
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        forward = getattr(model, "forward_features", model)
        forward(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"the forward pass never reached the layer {type(module).__name__}")
    return captured[0]


def dynamic_rotations(
    model2d: nn.Module, layer: str, slices: torch.Tensor, *, batch: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """The rotation a dynamic CrossDConv layer predicts for each 2D slice of a volume.

    Args:
        model2d: a 2D network holding the layer (its 2D forward predicts rotations; an
            inflated 3D network has dropped its rotation heads).
        layer: the layer's module name in ``model2d``.
        slices: (Z, C, H, W) network input, one 2D image per slice (normalised as the
            network expects, e.g. ``normalize_volume(volume).transpose(0, 1)``).
        batch: slices per forward pass.

    Returns:
        axes (Z, 3) unit vectors in (d, h, w) order and angles (Z,) radians, |angle| <= pi/4.
    """
    modules = dict(model2d.named_modules())
    if layer not in modules:
        raise ValueError(f"the model has no layer {layer!r}")
    module = modules[layer]
    if not isinstance(module, CrossDConv) or module.rotation != "dynamic":
        kind = module.rotation if isinstance(module, CrossDConv) else type(module).__name__
        raise ValueError(f"layer {layer!r} has no dynamic rotation (it is {kind})")
    if slices.ndim != 4:
        raise ValueError(f"slices must be (Z, C, H, W); got shape {tuple(slices.shape)}")
    parameter = next(model2d.parameters())
    was_training = model2d.training
    model2d.eval()
    axes, angles = [], []
    try:
        with torch.no_grad():
            for start in range(0, slices.shape[0], batch):
                x = slices[start : start + batch].to(device=parameter.device, dtype=parameter.dtype)
                layer_input = _run_until(model2d, module, x, want_input=True)
                axis, angle = module.predict_rotation(layer_input)
                axes.append(axis.double().cpu())
                angles.append(angle.double().cpu())
    finally:
        model2d.train(was_training)
    return torch.cat(axes).numpy(), torch.cat(angles).numpy()


def feature_maps(model3d: nn.Module, net_input: torch.Tensor, level: int) -> tuple[np.ndarray, np.ndarray]:
    """One backbone level's feature maps on a volume, computed only as far as that level.

    Args:
        model3d: an inflated backbone with ``forward_features`` and ``feature_info``.
        net_input: (C, Z, Y, X) network input (``normalize_volume``'s output).
        level: index into ``model3d.feature_info`` (0 = finest).

    Returns:
        maps (C_level, z, y, x) float32 at the level's resolution, and zoom (3,): voxels of
        the input per voxel of the maps along (Z, Y, X), i.e. ``input shape / maps shape``.
    """
    info = getattr(model3d, "feature_info", None)
    if not info:
        raise ValueError("the model has no feature_info: feature maps need a backbone of napari_crossd.models")
    if not 0 <= level < len(info):
        raise ValueError(f"level must be in 0..{len(info) - 1}; got {level}")
    if net_input.ndim != 4:
        raise ValueError(f"net_input must be (C, Z, Y, X); got shape {tuple(net_input.shape)}")
    module = model3d.get_submodule(info[level]["module"])
    parameter = next(model3d.parameters())
    was_training = model3d.training
    model3d.eval()
    try:
        with torch.no_grad():
            x = net_input[None].to(device=parameter.device, dtype=parameter.dtype)
            maps = _run_until(model3d, module, x, want_input=False)[0]
    finally:
        model3d.train(was_training)
    zoom = np.asarray(net_input.shape[1:], dtype=np.float64) / np.asarray(maps.shape[1:], dtype=np.float64)
    return maps.float().cpu().numpy(), zoom


# -- one filter, looked at closely ------------------------------------------------------------
PHASE_FLOOR = 0.05
"""Spectrum bins whose amplitude is below this fraction of the filter's largest are masked
(NaN) in :func:`filter_spectrum`: their phase says nothing."""


def norm_order(bank: torch.Tensor | np.ndarray) -> np.ndarray:
    """Output channels of a bank (C_out, ...) by L2 norm, largest first (ties: lower index first)."""
    flat = np.asarray(torch.as_tensor(bank).detach().double().cpu().flatten(1).norm(dim=1))
    return np.argsort(-flat, kind="stable")


def filter_overview(bank: torch.Tensor, *, max_out: int = 32, max_in: int = 16) -> tuple[KernelGrid, np.ndarray]:
    """The layer's filters as a :class:`KernelGrid`, sorted by norm and each scaled to its own peak.

    Each output channel's kernels (all its inputs) are divided by their max |w|, so every
    filter's pattern is visible whatever its size (torchvision / lucent style); rows (or
    tiles) run from the largest-norm filter down. The grid's ``peak`` is 1.

    Returns:
        (grid, order): ``order[r]`` is the output channel drawn in row (or tile) ``r``; only the
        first ``max_out`` of the order are drawn.
    """
    bank = torch.as_tensor(bank).detach().float().cpu()
    order = norm_order(bank)
    drawn = bank[torch.as_tensor(order[:max_out].copy())]
    peaks = drawn.flatten(1).abs().amax(dim=1).clamp_min(1e-30)
    unit = drawn / peaks.view(-1, *([1] * (drawn.ndim - 1)))
    return kernel_grid(unit, max_out=max_out, max_in=max_in), order


def pick_filter(bank: torch.Tensor | np.ndarray, output: int, input_: int | None = None) -> np.ndarray:
    """One 3D kernel of a bank: (k_d, k_h, k_w) float32, ``bank[output, input_]`` or, with
    ``input_=None``, the mean over the filter's inputs."""
    bank = torch.as_tensor(bank).detach().float().cpu()
    if not 0 <= output < bank.shape[0]:
        raise ValueError(f"output channel must be in 0..{bank.shape[0] - 1}; got {output}")
    if input_ is None:
        return bank[output].mean(0).numpy()
    if not 0 <= input_ < bank.shape[1]:
        raise ValueError(f"input channel must be in 0..{bank.shape[1] - 1}; got {input_}")
    return bank[output, input_].numpy().copy()


def side_by_side(*volumes: np.ndarray, gap: int = 1) -> np.ndarray:
    """Equal-shape (..., h, w) arrays laid along the last axis, ``gap`` NaN columns apart."""
    shape = volumes[0].shape
    if any(v.shape != shape for v in volumes):
        raise ValueError(f"side_by_side needs equal shapes; got {[v.shape for v in volumes]}")
    blank = np.full((*shape[:-1], gap), np.nan, dtype=np.float32)
    parts = []
    for i, volume in enumerate(volumes):
        parts += ([blank] if i else []) + [np.asarray(volume, dtype=np.float32)]
    return np.concatenate(parts, axis=-1)


def depth_strip(kernel: np.ndarray, gap: int = 1) -> np.ndarray:
    """A (k_d, k_h, k_w) kernel's depth slices side by side: (k_h, k_d * (k_w + gap) - gap),
    slice d in columns ``d * (k_w + gap)`` onwards, NaN between slices."""
    return side_by_side(*kernel, gap=gap)


def symmetric_limit(*arrays: np.ndarray) -> float:
    """max |value| over arrays (NaN ignored): colour limits (-limit, limit) centre zero; 1 if all zero."""
    peak = max(float(np.nanmax(np.abs(a))) if np.isfinite(a).any() else 0.0 for a in arrays)
    return peak if peak > 0 else 1.0


def filter_spectrum(
    kernel: np.ndarray, rotated: np.ndarray, floor: float = PHASE_FLOOR
) -> tuple[np.ndarray, np.ndarray]:
    """Phase shift (degrees) of one kernel's rotation and the spectrum amplitude behind it.

    Args:
        kernel, rotated: U and the rotated U, (k, k, k).
        floor: bins where either spectrum's amplitude is below ``floor`` x its largest are
            masked.

    Returns:
        (phase, amplitude), both (k, k, k) float32, zero frequency at the centre (``fftshift``):
        phase = ``angle(FFT3(rotated)) - angle(FFT3(U))`` in degrees in (-180, 180], NaN where
        masked; amplitude = |FFT3(U)| / its max (0..1).
    """
    u = torch.as_tensor(np.asarray(kernel), dtype=torch.float64)
    r = torch.as_tensor(np.asarray(rotated), dtype=torch.float64)
    if u.shape != r.shape or u.ndim != 3:
        raise ValueError(f"kernel and rotated must both be (k, k, k); got {tuple(u.shape)} and {tuple(r.shape)}")
    spectrum, turned = torch.fft.fftn(u), torch.fft.fftn(r)
    magnitude, turned_magnitude = spectrum.abs(), turned.abs()
    peak = float(magnitude.max())
    amplitude = magnitude / peak if peak > 0 else magnitude
    turned_peak = float(turned_magnitude.max())
    defined = (magnitude > floor * peak) & (turned_magnitude > floor * turned_peak)
    phase = torch.rad2deg(torch.angle(turned * spectrum.conj()))
    phase = torch.where(defined, phase, torch.full_like(phase, math.nan))
    return (torch.fft.fftshift(phase).float().numpy(), torch.fft.fftshift(amplitude).float().numpy())


def layer_u(module: nn.Module) -> torch.Tensor:
    """The layer's own 3D kernel before any rotation: a CrossDConv's U (padded to its support),
    else :func:`layer_kernels`."""
    if isinstance(module, CrossDConv):
        with torch.no_grad():
            return static_kernels(module.weights_3d.detach().float(), None, support=module.kernel_support).cpu()
    return layer_kernels(module)


@dataclass(frozen=True)
class FilterRotation:
    """One filter rotated: U, the rotated U and the 2D kernel it gives (the central slice).

    Attributes:
        u, rotated: (k, k, k); applied: (k, k), ``rotated[k // 2]``, what a 2D forward with this
        rotation convolves with; rotvec: (3,) the rotation, axis x angle (radians, (d, h, w)).
    """

    u: np.ndarray
    rotated: np.ndarray
    applied: np.ndarray
    rotvec: np.ndarray

    def describe(self) -> str:
        angle = float(np.linalg.norm(self.rotvec))
        axis = self.rotvec / angle if angle > 0 else np.zeros(3)
        return (f"{math.degrees(angle):.2f} deg about (d, h, w) = ({axis[0]:.3f}, {axis[1]:.3f}, {axis[2]:.3f})")


def rotate_filter(u: np.ndarray, rotvec) -> FilterRotation:
    """``u`` (k, k, k) rotated exactly by the axis-angle ``rotvec`` ((3,), radians, (d, h, w))."""
    vector = np.asarray(rotvec, dtype=np.float64).reshape(3)
    angle = float(np.linalg.norm(vector))
    kernel = torch.as_tensor(np.asarray(u, dtype=np.float32))[None, None]
    rotated = rotate_bank(kernel, vector if angle > 0 else (1.0, 0.0, 0.0), angle)[0, 0].numpy()
    return FilterRotation(np.asarray(u, dtype=np.float32), rotated, rotated[rotated.shape[0] // 2].copy(), vector)
